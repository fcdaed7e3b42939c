"""Input readers: find the raw files of a dataset and parse raw lines into flat columns.

Pure Python (no Ray): the `prepare` pipeline calls these on batches of raw lines (line formats)
or on the text of a whole small file (seq_json). Parsers are total: bad data never raises, it
becomes a row with `error` set (and empty ids) so the pipeline can count drops by reason. Every
input line gives at least one row (a blank one an "empty_line" row) and column `src` says which
line each row came from, so every line of a file is accounted for (`FileReport`). `check_file`
refuses an unusable file (empty, another compression, broken gzip, not the named format) with one
line naming it, before the parallel read.

Interaction columns: user:str, item:str, rating:float (NaN when the format has none),
ts:float (unix seconds; position 0,1,2.. in the user's sequence for sequence formats), error.
Metadata columns: item:str, title:str, description:str, categories:str (names joined by
CATEGORY_SEP; for Amazon the brand is appended last), error. Text is cleaned with `clean_text`
(HTML entities/tags, whitespace) but not length-capped.

Formats (DataConfig.format):
  recbole     RecBole atomic files `<name>.inter` (+ optional `<name>.item`), tab separated, `name:type` header
  seq_json    `<name>.inter.json` {user: [item, ...]} + `<name>.item.json` {item: {title, description, brand, categories}}
  seq_txt     `user_sequence.txt` ("user item item ...") + optional `item_generative_indexing_phase_0.txt`
  amazon2018  Amazon 2018 (and 2014) dumps: `reviews_<Cat>_5.json`, `<Cat>_5.json`, `reviews_<Cat>.json` or
              `<Cat>.json` + `meta_<Cat>.json` (each optionally .gz); 2014 meta lines are Python literals
  amazon2023  Amazon 2023: `<Cat>.jsonl` + `meta_<Cat>.jsonl` (optionally .gz), timestamps in milliseconds
"""
from __future__ import annotations

import ast
import gzip
import importlib.util
import io
import json
import math
import re
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from allmrec.data.text import clean_text

FORMATS = ("amazon2018", "amazon2023", "seq_json", "seq_txt", "recbole")
INTER_COLUMNS = ("user", "item", "rating", "ts", "error")
META_COLUMNS = ("item", "title", "description", "categories", "error")
CATEGORY_SEP = " | "  # Amazon category names contain ", " ("Tapes, Adhesives & Sealants")
NAN = float("nan")

RECBOLE_INTER_HEADER = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
RECBOLE_ITEM_HEADER = ["item_id:token", "movie_title:token_seq", "release_year:token", "class:token_seq"]
_RECBOLE_TYPES = {"token", "token_seq", "float", "float_seq"}

SEQ_TXT_INTER = "user_sequence.txt"
SEQ_TXT_ITEM = "item_generative_indexing_phase_0.txt"
_RECBOLE_HINT = "pip install --no-deps recbole==1.2.1"


# ---------------------------------------------------------------------------------------------
# Locating the files


@dataclass
class InputFiles:
    interactions: list[str]  # absolute paths
    meta: list[str]  # absolute paths; may be empty (no item text: prompts fall back to "Item <id>")
    line_based: bool  # True: one record per line; False: whole-file JSON
    notes: list[str] = field(default_factory=list, compare=False)  # files looked at and ignored, and why


def resolve_inputs(fmt: str, path: str, category: str = "") -> InputFiles:
    """Find the interaction and metadata files of a dataset (see the module docstring for layouts).

    `category` picks the Amazon category (or the RecBole / seq_json dataset name) when a folder
    holds several; it is inferred when exactly one exists.
    """
    _check_format(fmt)
    if path.startswith("packaged:"):
        if fmt != "recbole":
            raise ValueError(f"data.path={path!r} is a packaged RecBole dataset: it needs data.format=recbole")
        p = _packaged_recbole(path[len("packaged:"):])
    else:
        p = Path(path).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"data.path {path!r} does not exist")
    if fmt == "recbole":
        return _resolve_recbole(p, category)
    if fmt == "seq_json":
        return _resolve_seq_json(p, category)
    if fmt == "seq_txt":
        return _resolve_seq_txt(p)
    return _resolve_amazon(fmt, p, category)


def _packaged_recbole(name: str) -> Path:
    # find_spec locates the installed package without importing it (recbole pulls heavy deps).
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"packaged:{name} needs the recbole wheel for its example data: {_RECBOLE_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "dataset_example"
    folder = root / name
    if not folder.is_dir():
        have = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"packaged:{name}: no folder {folder} in the recbole wheel (available: {have})")
    return folder


def _resolve_recbole(p: Path, name: str) -> InputFiles:
    if p.is_file():
        if p.suffix != ".inter":
            raise ValueError(f"recbole data.path {p} must be a folder or a .inter file")
        inter = p
    else:
        found = sorted(p.glob("*.inter"))
        if name:
            found = [f for f in found if f.stem == name]
        if not found:
            want = f"{name}.inter" if name else "<name>.inter"
            raise FileNotFoundError(f"recbole: expected {want} in {p}")
        if len(found) > 1:
            raise ValueError(f"recbole: several .inter files in {p} ({[f.stem for f in found]}); set data.category")
        inter = found[0]
    item = inter.with_suffix(".item")
    return InputFiles([str(inter)], [str(item)] if item.is_file() else [], True)


def _resolve_seq_json(p: Path, name: str) -> InputFiles:
    suffix = ".inter.json"
    if p.is_file():
        if not p.name.endswith(suffix):
            raise ValueError(f"seq_json data.path {p} must be a folder or a *{suffix} file")
        inter = p
    else:
        found = sorted(f for f in p.glob("*" + suffix) if not name or f.name == name + suffix)
        if not found:
            raise FileNotFoundError(f"seq_json: expected {(name or '<name>') + suffix} in {p}")
        if len(found) > 1:
            raise ValueError(f"seq_json: several *{suffix} files in {p} ({[f.name for f in found]}); set data.category")
        inter = found[0]
    item = inter.with_name(inter.name[: -len(suffix)] + ".item.json")
    if not item.is_file():
        raise FileNotFoundError(f"seq_json: expected the item file {item.name} next to {inter}")
    return InputFiles([str(inter)], [str(item)], False)


def _resolve_seq_txt(p: Path) -> InputFiles:
    inter = p if p.is_file() else p / SEQ_TXT_INTER
    if not inter.is_file():
        raise FileNotFoundError(f"seq_txt: expected {SEQ_TXT_INTER} in {p}")
    item = inter.parent / SEQ_TXT_ITEM
    return InputFiles([str(inter)], [str(item)] if item.is_file() else [], True)


# Review file names tried in order (the 5-core file first: same result after k-core >= 5, far smaller).
_AMAZON = {
    "amazon2018": ((".json", ".json.gz"), ("reviews_{c}_5", "{c}_5", "reviews_{c}", "{c}")),
    "amazon2023": ((".jsonl", ".jsonl.gz"), ("{c}",)),
}


def _amazon_category(stem: str) -> str:
    if stem.startswith("reviews_"):
        stem = stem[len("reviews_"):]
    return stem[:-2] if stem.endswith("_5") else stem


def _split_ext(name: str, exts: tuple[str, ...]) -> str | None:
    for e in sorted(exts, key=len, reverse=True):
        if name.endswith(e):
            return name[: -len(e)]
    return None


def _resolve_amazon(fmt: str, p: Path, category: str) -> InputFiles:
    exts, templates = _AMAZON[fmt]
    notes: list[str] = []
    shown = " or ".join(t.format(c="<Cat>") + exts[0] + "(.gz)" for t in templates)
    if p.is_file():
        stem = _split_ext(p.name, exts)
        if stem is None:
            raise ValueError(f"{fmt}: data.path {p} is not a {'/'.join(exts)} file")
        if stem.startswith("meta_"):
            raise ValueError(f"{fmt}: data.path {p} is a metadata file; give the reviews file or its folder")
        reviews, folder, category = p, p.parent, category or _amazon_category(stem)
    else:
        folder = p
        if not category:
            # a category is a file named like a reviews dump: reviews_<Cat>*, <Cat>_5 by the name alone
            # (a broken one then fails its check with a precise error), a bare <Cat>.json only when its
            # first records are reviews: an unrelated config.json next to the dumps is ignored, with a note
            cats = set()
            for f in sorted(folder.iterdir()):
                stem = _split_ext(f.name, exts)
                if stem is not None and f.is_file() and not stem.startswith("meta_"):
                    named = stem.startswith("reviews_") or stem.endswith("_5")
                    why = "" if named else _not_a_review_dump(fmt, f)
                    if why:
                        notes.append(f"ignored {f.name}: {why}")
                    else:
                        cats.add(_amazon_category(stem))
            if not cats:
                seen = f" (ignored: {'; '.join(n[len('ignored '):] for n in notes)})" if notes else ""
                raise FileNotFoundError(f"{fmt}: expected {shown} in {folder}{seen}")
            if len(cats) > 1:
                raise ValueError(f"{fmt}: several categories in {folder} ({sorted(cats)}); set data.category")
            category = cats.pop()
        names = [t.format(c=category) + e for t in templates for e in exts]
        hits = [folder / n for n in names if (folder / n).is_file()]
        if not hits:
            raise FileNotFoundError(f"{fmt}: expected one of {names} in {folder}")
        reviews = hits[0]
    # The 2023 release keeps metadata in a sibling folder (raw/review_categories, raw/meta_categories).
    metas = [d / f"meta_{category}{e}" for d in (folder, folder.parent / "meta_categories") for e in exts]
    meta = next((m for m in metas if m.is_file()), None)
    if meta is None:
        raise FileNotFoundError(f"{fmt}: expected metadata meta_{category}{exts[0]}(.gz) in {folder}")
    return InputFiles([str(reviews)], [str(meta)], True, notes)


def _not_a_review_dump(fmt: str, path: Path, n_lines: int = 20) -> str:
    """Why `path` is not an Amazon reviews dump of `fmt` ("" when one of its first records is a review)."""
    user, items = ("user_id", ("parent_asin", "asin")) if fmt == "amazon2023" else ("reviewerID", ("asin",))
    try:
        with open_text(path) as f:
            head = [ln for ln in (f.readline() for _ in range(n_lines)) if ln.strip()]
    except (OSError, EOFError, zlib.error) as e:
        return f"unreadable ({short_error(e)})"
    for line in head:
        rec = _load_record(line)
        if rec is not None and user in rec and any(k in rec for k in items):
            return ""
    if not head:
        return "empty"
    return f"no {user} + {'/'.join(items)} record in its first {len(head)} lines"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"data.format={fmt!r}: expected one of {'|'.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------
# Small helpers shared by the parsers


def open_text(path: str | Path) -> io.TextIOBase:
    """Open a text file, gunzipping when it is gzip (by its magic bytes, not its name)."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    # newline="\n": lines end at "\n" only, as in prepare's parallel reader (a lone "\r" or U+2028 is
    # legal inside a JSON string and must not split a record)
    if gz:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="\n")
    return open(path, encoding="utf-8", errors="replace", newline="\n")


def read_recbole_header(path: str | Path) -> list[str]:
    """The `name:type` fields of a RecBole atomic file's first line."""
    with open_text(path) as f:
        first = f.readline().rstrip("\r\n")
    fields = first.split("\t")
    if not _is_recbole_header(fields):
        raise ValueError(f"{path}: first line {first[:200]!r} is not a RecBole header (name:type fields)")
    return [x.strip() for x in fields]


def _is_recbole_header(fields: list[str]) -> bool:
    for f in fields:
        name, sep, typ = f.strip().rpartition(":")
        if not sep or not name or typ not in _RECBOLE_TYPES:
            return False
    return True


def _header_index(header: list[str], required: tuple[str, ...], path_hint: str) -> dict[str, int]:
    idx = {h.strip().rpartition(":")[0] or h.strip(): i for i, h in enumerate(header)}
    missing = [r for r in required if r not in idx]
    if missing:
        raise ValueError(f"RecBole {path_hint} header {header} lacks {missing}")
    return idx


def _id(v: object) -> str | None:
    """A usable id: non-empty string or integer (JSON may hold either); anything else is missing."""
    if isinstance(v, str):
        v = v.strip()
        return v or None
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def _num(v: object) -> float | None:
    """A finite number from a JSON number or numeric string; None when it is not one."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return None
    else:
        return None
    return x if math.isfinite(x) else None


def _text(v: object) -> str:
    """Text from a string, a (nested) list of strings (joined with spaces) or a number."""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return " ".join(t for t in (_text(x) for x in v) if t)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return ""


def _names(v: object) -> list[str]:
    """Category names from a string, a list, or the 2014 list of category paths."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, (list, tuple)):
        return [n for x in v for n in _names(x)]
    return []


def _join_categories(names: Iterable[str]) -> str:
    seen: dict[str, None] = {}
    for n in names:
        n = clean_text(n)
        if n:
            seen.setdefault(n, None)
    return CATEGORY_SEP.join(seen)


def _load_record(line: str) -> dict | None:
    """A JSON object; failing that a Python dict literal (2014 metadata). Never eval: literal_eval
    only accepts literals, so `__import__('os').system(...)` is rejected, not run."""
    try:
        rec = json.loads(line)
    except Exception:  # JSONDecodeError, or RecursionError on absurdly nested input
        if not line.lstrip().startswith("{"):
            return None
        try:
            rec = ast.literal_eval(line.strip())
        except Exception:  # SyntaxError, ValueError, RecursionError, MemoryError on hostile input
            return None
    return rec if isinstance(rec, dict) else None


def _review_time(v: object) -> float | None:
    """Amazon 2014/2018 `reviewTime` "09 13, 2009" as unix seconds (UTC midnight)."""
    if not isinstance(v, str):
        return None
    try:
        return datetime.strptime(v.strip(), "%m %d, %Y").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# Interactions


class _Inter:
    """Column builder for interaction rows."""

    def __init__(self) -> None:
        self.user: list[str] = []
        self.item: list[str] = []
        self.rating: list[float] = []
        self.ts: list[float] = []
        self.error: list[str | None] = []
        self.src: list[int] = []
        self.i = 0  # the input line (or record) being parsed: every row it gives carries it in `src`

    def add(self, user: str, item: str, rating: float, ts: float) -> None:
        self.user.append(user)
        self.item.append(item)
        self.rating.append(rating)
        self.ts.append(ts)
        self.error.append(None)
        self.src.append(self.i)

    def bad(self, reason: str) -> None:
        self.user.append("")
        self.item.append("")
        self.rating.append(NAN)
        self.ts.append(NAN)
        self.error.append(reason)
        self.src.append(self.i)

    def sequence(self, user: str, items: list[str], positions: list[float] | None = None) -> None:
        n = len(items)
        self.user.extend([user] * n)
        self.item.extend(items)
        self.rating.extend([NAN] * n)
        self.ts.extend(positions if positions is not None else [float(i) for i in range(n)])
        self.error.extend([None] * n)
        self.src.extend([self.i] * n)

    def columns(self) -> dict[str, list]:
        return {"user": self.user, "item": self.item, "rating": self.rating, "ts": self.ts, "error": self.error,
                "src": self.src}


def parse_interaction_lines(fmt: str, lines: list[str], header: list[str] | None = None) -> dict[str, list]:
    """Parse a batch of raw lines of an interaction file into INTER_COLUMNS.

    Every line gives at least one row (a sequence line one row per item); a bad line gives one
    row with `error` set, a blank line one with "empty_line". Column `src` holds each row's line
    index in `lines` (see `line_report`). `header` (RecBole only) comes from `read_recbole_header`;
    a header line inside the batch gives a "header" row (and, without `header`, sets the layout
    of the lines after it).
    """
    _check_format(fmt)
    out = _Inter()
    if fmt == "recbole":
        _recbole_inter(lines, header, out)
    elif fmt == "seq_txt":
        for out.i, line in enumerate(lines):
            parts = line.split()
            if not parts:
                out.bad("empty_line")
            elif len(parts) < 2:
                out.bad("empty_sequence")
            else:
                out.sequence(parts[0], parts[1:])
    elif fmt == "seq_json":
        raise ValueError("seq_json is a whole-file JSON format: use parse_seq_json(text)")
    else:
        _amazon_inter(fmt == "amazon2023", lines, out)
    return out.columns()


def _recbole_inter(lines: list[str], header: list[str] | None, out: _Inter) -> None:
    def layout(h: list[str]) -> tuple[int, int, int, int, int]:
        idx = _header_index(h, ("user_id", "item_id"), ".inter")
        return len(h), idx["user_id"], idx["item_id"], idx.get("rating", -1), idx.get("timestamp", -1)

    n, ui, ii, ri, ti = layout(header or RECBOLE_INTER_HEADER)
    for out.i, line in enumerate(lines):
        line = line.rstrip("\r\n")
        if not line.strip():
            out.bad("empty_line")
            continue
        f = line.split("\t")
        if ":" in f[0] and _is_recbole_header(f):
            if header is None:
                n, ui, ii, ri, ti = layout(f)
            out.bad("header")
            continue
        if len(f) != n:
            out.bad("bad_columns")
            continue
        user, item = f[ui].strip(), f[ii].strip()
        if not user:
            out.bad("missing_user")
            continue
        if not item:
            out.bad("missing_item")
            continue
        rating = NAN
        if ri >= 0:
            r = _num(f[ri])
            if r is None:
                out.bad("bad_rating")
                continue
            rating = r
        ts = NAN
        if ti >= 0:
            t = _num(f[ti])
            if t is None or t < 0:
                out.bad("bad_timestamp")
                continue
            ts = t
        out.add(user, item, rating, ts)


def _amazon_inter(is2023: bool, lines: list[str], out: _Inter) -> None:
    # 2014/2018: reviewerID, asin, overall, unixReviewTime (s). 2023: user_id, parent_asin, rating, timestamp (ms).
    k_user, k_rating, k_ts = ("user_id", "rating", "timestamp") if is2023 else ("reviewerID", "overall", "unixReviewTime")
    for out.i, line in enumerate(lines):
        if not line or line.isspace():
            out.bad("empty_line")
            continue
        rec = _load_record(line)
        if rec is None:
            out.bad("bad_json")
            continue
        user = _id(rec.get(k_user))
        if user is None:
            out.bad("missing_user")
            continue
        item = (_id(rec.get("parent_asin")) or _id(rec.get("asin"))) if is2023 else _id(rec.get("asin"))
        if item is None:
            out.bad("missing_item")
            continue
        raw = rec.get(k_rating)
        rating = NAN
        if raw is not None:
            r = _num(raw)
            if r is None:
                out.bad("bad_rating")
                continue
            rating = r
        raw = rec.get(k_ts)
        if raw is None:
            t = None if is2023 else _review_time(rec.get("reviewTime"))
            if t is None:
                out.bad("missing_timestamp")
                continue
        else:
            t = _num(raw)
            if t is None or t < 0:
                out.bad("bad_timestamp")
                continue
            if is2023:
                t /= 1000.0
        out.add(user, item, rating, t)


def parse_seq_json(text: str | bytes) -> dict[str, list]:
    """Parse a whole `{user: [item, ...]}` file (amazon-scientific) into INTER_COLUMNS; ts = position.

    The unit is the record (one user): `src` is its position in the file. A record with some
    unusable items keeps the others; its "missing_item" rows follow its kept rows."""
    out = _Inter()
    try:
        obj = json.loads(text)
    except Exception:
        obj = None
    if not isinstance(obj, dict):
        out.bad("bad_json")
        return out.columns()
    for out.i, (u, seq) in enumerate(obj.items()):
        user = _id(u)
        if user is None:
            out.bad("missing_user")
        elif not isinstance(seq, list):
            out.bad("bad_sequence")
        elif not seq:
            out.bad("empty_sequence")
        else:
            items = [_id(x) for x in seq]
            if None in items:  # keep the good items at their original positions
                keep = [(it, float(i)) for i, it in enumerate(items) if it is not None]
                if keep:
                    out.sequence(user, [k[0] for k in keep], [k[1] for k in keep])
                for _ in range(items.count(None)):
                    out.bad("missing_item")
            else:
                out.sequence(user, items)
    return out.columns()


# ---------------------------------------------------------------------------------------------
# Item metadata


class _Meta:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {c: [] for c in META_COLUMNS + ("src",)}
        self.i = 0  # see _Inter

    def add(self, item: str, title: str, description: str, categories: str) -> None:
        c = self.cols
        c["item"].append(item)
        c["title"].append(title)
        c["description"].append(description)
        c["categories"].append(categories)
        c["error"].append(None)
        c["src"].append(self.i)

    def bad(self, reason: str) -> None:
        c = self.cols
        for k in ("item", "title", "description", "categories"):
            c[k].append("")
        c["error"].append(reason)
        c["src"].append(self.i)


def parse_meta_lines(fmt: str, lines: list[str], header: list[str] | None = None) -> dict[str, list]:
    """Parse a batch of raw lines of a metadata file into META_COLUMNS (same contract as interactions)."""
    _check_format(fmt)
    out = _Meta()
    if fmt == "recbole":
        _recbole_meta(lines, header, out)
    elif fmt == "seq_txt":
        for out.i, line in enumerate(lines):
            parts = line.split(None, 1)
            if parts:
                out.add(parts[0], clean_text(parts[1]) if len(parts) > 1 else "", "", "")
            else:
                out.bad("empty_line")
    elif fmt == "seq_json":
        raise ValueError("seq_json is a whole-file JSON format: use parse_seq_json_items(text)")
    else:
        is2023 = fmt == "amazon2023"
        for out.i, line in enumerate(lines):
            if not line or line.isspace():
                out.bad("empty_line")
                continue
            rec = _load_record(line)
            if rec is None:
                out.bad("bad_json")
                continue
            _amazon_meta(rec, is2023, out)
    return out.cols


def _amazon_meta(rec: dict, is2023: bool, out: _Meta) -> None:
    if is2023:
        item = _id(rec.get("parent_asin")) or _id(rec.get("asin"))
        cats = _names(rec.get("categories")) or _names(rec.get("main_category"))
        details = rec.get("details")
        brand = _text(rec.get("store")) or (_text(details.get("Brand")) if isinstance(details, dict) else "")
    else:  # 2018: category (list), 2014: categories (list of category paths)
        item = _id(rec.get("asin"))
        cats = _names(rec.get("category")) or _names(rec.get("categories"))
        brand = _text(rec.get("brand"))
    if item is None:
        out.bad("missing_item")
        return
    out.add(item, clean_text(_text(rec.get("title"))), clean_text(_text(rec.get("description"))),
            _join_categories(cats + [brand]))


def _recbole_meta(lines: list[str], header: list[str] | None, out: _Meta) -> None:
    def layout(h: list[str]) -> tuple[int, int, int, int, int, int, int]:
        idx = _header_index(h, ("item_id",), ".item")

        def first(*names: str) -> int:
            return next((idx[n] for n in names if n in idx), -1)

        return (len(h), idx["item_id"], first("movie_title", "title", "name", "item_name"),
                first("release_year", "year"), first("description"),
                first("class", "genre", "genres", "categories", "category"), first("brand"))

    n, ii, ti, yi, di, ci, bi = layout(header or RECBOLE_ITEM_HEADER)
    for out.i, line in enumerate(lines):
        line = line.rstrip("\r\n")
        if not line.strip():
            out.bad("empty_line")
            continue
        f = line.split("\t")
        if ":" in f[0] and _is_recbole_header(f):
            if header is None:
                n, ii, ti, yi, di, ci, bi = layout(f)
            out.bad("header")
            continue
        if len(f) != n:
            out.bad("bad_columns")
            continue
        item = f[ii].strip()
        if not item:
            out.bad("missing_item")
            continue
        title = clean_text(f[ti]) if ti >= 0 else ""
        year = f[yi].strip() if yi >= 0 else ""
        # ML-100K keeps the year in its own column; the prompt title is "Toy Story (1995)".
        if title and len(year) == 4 and year.isdigit() and not title.endswith(f"({year})"):
            title = f"{title} ({year})"
        # token_seq genres are space separated ("Animation Children's Comedy"); no genre has a space.
        cats = f[ci].split() if ci >= 0 else []
        if bi >= 0:
            cats.append(f[bi])
        out.add(item, title, clean_text(f[di]) if di >= 0 else "", _join_categories(cats))


_SCI_CAT_SPLIT = re.compile(r",(?!\s)")  # "A & B,Tapes, Adhesives & Sealants,C": split only at "," without a space


def parse_seq_json_items(text: str | bytes) -> dict[str, list]:
    """Parse a whole `{item: {title, description, brand, categories}}` file into META_COLUMNS."""
    out = _Meta()
    try:
        obj = json.loads(text)
    except Exception:
        obj = None
    if not isinstance(obj, dict):
        out.bad("bad_json")
        return out.cols
    for out.i, (k, rec) in enumerate(obj.items()):
        item = _id(k)
        if item is None:
            out.bad("missing_item")
            continue
        if not isinstance(rec, dict):
            out.bad("bad_record")
            continue
        cats = rec.get("categories")
        names = _SCI_CAT_SPLIT.split(cats) if isinstance(cats, str) else _names(cats)
        out.add(item, clean_text(_text(rec.get("title"))), clean_text(_text(rec.get("description"))),
                _join_categories(names + [_text(rec.get("brand"))]))
    return out.cols


# ---------------------------------------------------------------------------------------------
# Accounting for every input line


def first_rows(src: list[int]) -> list[bool]:
    """True for the first row of each input line (rows of one line are adjacent in parser output)."""
    return [i == 0 or src[i] != src[i - 1] for i in range(len(src))]


@dataclass
class FileReport:
    """What became of every line (record, for whole-file JSON) of one input file.

    `lines` = `kept` + sum(`dropped`): a kept line gave at least one usable row, a dropped one
    none, for the reason it is filed under ("empty_line", "bad_json", "header", ...).
    `first_line[reason]` is the first line dropped for it. `partial` counts unusable items
    inside kept records (seq_json sequences with a bad item id), not lines."""

    path: str
    kind: str  # "interactions" | "metadata"
    unit: str  # "line" | "record"
    lines: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)
    partial: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str | None, n: int, first: int) -> None:
        """Account `n` lines with `outcome` (None: kept), the first of them at line `first`."""
        self.lines += n
        if outcome is None:
            self.kept += n
            return
        self.dropped[outcome] = self.dropped.get(outcome, 0) + n
        self.first_line[outcome] = min(self.first_line.get(outcome, first), first)

    def to_dict(self) -> dict:
        return {"file": self.path, "kind": self.kind, "unit": self.unit, "lines": self.lines, "kept": self.kept,
                "dropped": dict(sorted(self.dropped.items(), key=lambda kv: -kv[1])),
                "first_line": self.first_line, **({"partial": self.partial} if self.partial else {})}


def line_report(cols: dict[str, list], path: str, kind: str, unit: str = "line") -> FileReport:
    """The FileReport of parser output holding one whole file, with absolute 1-based `line` numbers."""
    rep = FileReport(path, kind, unit)
    for e, ln, first in zip(cols["error"], cols["line"], first_rows(cols["line"])):
        if first:
            rep.add(e, 1, ln)
        elif e is not None:
            rep.partial[e] = rep.partial.get(e, 0) + 1
    return rep


def format_reports(reports: list[dict]) -> str:
    """The console table of FileReport dicts: one row per file, its drop reasons indented below."""
    if not reports:
        return ""
    names = [Path(r["file"]).name + f" ({r['kind']})" for r in reports]
    w = max(28, *(len(n) + 2 for n in names))
    out = [f"  {'input file':{w}s} {'lines':>11s} {'kept':>11s} {'dropped':>11s}"]
    for name, r in zip(names, reports):
        unit = r.get("unit", "line")
        out.append(f"  {name:{w}s} {r['lines']:>11,} {r['kept']:>11,} {sum(r['dropped'].values()):>11,}"
                   + ("  (records)" if unit != "line" else ""))
        for reason, n in r["dropped"].items():
            out.append(f"  {'  ' + reason:{w}s} {'':>11s} {'':>11s} {n:>11,}  first at {unit} "
                       f"{r['first_line'][reason]:,}")
        for reason, n in r.get("partial", {}).items():
            out.append(f"  {'  ' + reason:{w}s} {'':>11s} {'':>11s} {'(' + format(n, ',') + ')':>11s}  "
                       "items dropped inside kept records")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Checking a file before the parallel read (one clear error per bad file)


class InputError(ValueError):
    """An input file that cannot be used; the message names the file (and line) in one line."""


GZIP_MAGIC = b"\x1f\x8b"
_OTHER_COMPRESSION = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip",
                      b"7z\xbc\xaf\x27\x1c": "7z", b"\x04\x22\x4d\x18": "lz4"}
HEAD_LINES = 200  # lines parsed by check_file


def is_gzip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


@dataclass
class FileCheck:
    path: str
    gzip: bool  # by the magic bytes, whatever the name says
    note: str = ""  # a harmless oddity worth a log line (a plain-text file named .gz)


def check_file(fmt: str, path: str, kind: str) -> FileCheck:
    """Cheap checks of one input file before the parallel read; raises InputError (one line, naming
    the file and where it applies the line) for a file that cannot be what `fmt` names:
    empty, another compression, a gzip stream broken within its first lines, or first lines of
    which none is a usable record. Only the head is read: a stream cut off later, or a file that
    turns out to hold no usable line, is caught by the full read (prepare's line accounting)."""
    p = Path(path)
    name = p.name
    if p.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes)")
    with open(p, "rb") as f:
        magic = f.read(6)
    gz = magic[:2] == GZIP_MAGIC
    for m, what in _OTHER_COMPRESSION.items():
        if magic.startswith(m):
            raise InputError(f"{path}: the file is {what}-compressed; {fmt} files are read as plain text or gzip "
                             f"(recompress it with gzip or decompress it)")
    note = ""
    if name.endswith(".gz") and not gz:
        note = f"{path} is named .gz but is not gzip-compressed: read as plain text"
    elif gz and not name.endswith(".gz"):
        note = f"{path} is gzip-compressed without a .gz name: read decompressed"
    if fmt == "seq_json":  # whole-file JSON: parsed in one piece by the full read
        return FileCheck(str(path), gz, note)
    lines, ended = [], False
    try:
        with open_text(p) as f:
            for _ in range(HEAD_LINES):
                line = f.readline()
                if not line:
                    ended = True
                    break
                lines.append(line.rstrip("\n"))
    except (OSError, EOFError, zlib.error) as e:  # a gzip stream that breaks within its first lines
        raise InputError(f"{path}: unreadable after line {len(lines):,} ({short_error(e)}): the gzip stream is "
                         "truncated or corrupt; download the file again") from None
    if ended and not any(ln.strip() for ln in lines):
        raise InputError(f"{path}: the file holds no data ({len(lines):,} blank lines)")
    header = None
    if fmt == "recbole":
        header = read_recbole_header(p)
    parse = parse_interaction_lines if kind == "interactions" else parse_meta_lines
    cols = parse(fmt, lines, header)
    errors = [e for e, first in zip(cols["error"], first_rows(cols["src"])) if first]
    data = [i for i, e in enumerate(errors) if e not in ("empty_line", "header")]
    usable = [i for i in data if errors[i] is None]
    if data and not usable and (ended or len(data) >= HEAD_LINES // 2):
        i = data[0]
        scope = f"none of its {len(data):,} non-blank lines" if ended else f"none of its first {len(data):,} lines"
        raise InputError(f"{path} line {i + 1}: {errors[i]} (starts {lines[i][:60]!r}); {scope} is a usable "
                         f"{fmt} {'review' if kind == 'interactions' else 'metadata'} record: is data.format "
                         "right, and is this the right file?")
    return FileCheck(str(path), gz, note)


def short_error(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    return f"{type(e).__name__}: {e}".splitlines()[0][:160]


# ---------------------------------------------------------------------------------------------
# In-process reading (small data, tests, a Ray-free path)


def _concat(parts: list[dict[str, list]], columns: tuple[str, ...]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    for p in parts:
        for c in columns:
            out[c].extend(p[c])
    return out


def _read_lines(fmt: str, path: str, parse, batch_lines: int) -> list[dict[str, list]]:
    header = read_recbole_header(path) if fmt == "recbole" else None
    parts, batch, start = [], [], 1

    def flush() -> None:
        part = parse(fmt, batch, header)
        part["line"] = [start + i for i in part.pop("src")]
        parts.append(part)

    with open_text(path) as f:
        for line in f:
            batch.append(line)
            if len(batch) >= batch_lines:
                flush()
                start += len(batch)
                batch = []
    if batch:
        flush()
    return parts


def _whole_file(path: str, parse) -> dict[str, list]:
    with open_text(path) as f:
        part = parse(f.read())
    part["line"] = [i + 1 for i in part.pop("src")]
    return part


def read_interactions(fmt: str, files: InputFiles, batch_lines: int = 65536,
                      reports: list[FileReport] | None = None) -> dict[str, list]:
    """All interaction rows of `files`, parsed in this process (INTER_COLUMNS + `line`, the row's
    1-based line (record) number in its file). `reports` gets one FileReport per file."""
    _check_format(fmt)
    parts = []
    for path in files.interactions:
        if fmt == "seq_json":
            new = [_whole_file(path, parse_seq_json)]
        else:
            new = _read_lines(fmt, path, parse_interaction_lines, batch_lines)
        parts.extend(new)
        if reports is not None:
            reports.append(line_report(_concat(new, INTER_COLUMNS + ("line",)), path, "interactions",
                                       "record" if fmt == "seq_json" else "line"))
    return _concat(parts, INTER_COLUMNS + ("line",))


def read_meta(fmt: str, files: InputFiles, batch_lines: int = 65536,
              reports: list[FileReport] | None = None) -> dict[str, list]:
    """All metadata rows of `files`, parsed in this process (META_COLUMNS + `line`; see read_interactions)."""
    _check_format(fmt)
    parts = []
    for path in files.meta:
        if fmt == "seq_json":
            new = [_whole_file(path, parse_seq_json_items)]
        else:
            new = _read_lines(fmt, path, parse_meta_lines, batch_lines)
        parts.extend(new)
        if reports is not None:
            reports.append(line_report(_concat(new, META_COLUMNS + ("line",)), path, "metadata",
                                       "record" if fmt == "seq_json" else "line"))
    return _concat(parts, META_COLUMNS + ("line",))
