"""The prepare job end to end on small files: k-core to a fixed point, splits, seeded candidates,
atomic output."""
from __future__ import annotations

import gzip
import json
import re
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from allmrec.config import load_config
from allmrec.data.load import Prepared
from pipelines import prepare as prep

pytestmark = pytest.mark.ray


def _write_seq_txt(folder: Path, seqs: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user_sequence.txt").write_text("".join(f"{u} {' '.join(s)}\n" for u, s in seqs.items()))
    items = sorted({i for s in seqs.values() for i in s})
    (folder / "item_generative_indexing_phase_0.txt").write_text("".join(f"{i} title of {i}\n" for i in items))


def _cfg(tmp_path: Path, data_dir: Path, *extra: str):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=seq_txt", f"data.path={data_dir}",
                              "ray.num_cpus=4", *extra])


def test_kcore_reaches_fixed_point_where_one_pass_does_not(ray_session, tmp_path):
    # k=3. A ring of 30 users over 30 items (each item 3 interactions); u1, u2 and u4 share item "z".
    # u4's other items are rare: pass 1 removes r1, r2 -> u4 keeps 1 item and is dropped -> z falls to 2
    # -> pass 2 removes z -> u1, u2 fall to 2 items and are dropped. One counting pass would keep z and u4.
    g = [f"g{i:02d}" for i in range(30)]
    seqs = {f"w{j:02d}": [g[j], g[(j + 1) % 30], g[(j + 2) % 30]] for j in range(30)}
    seqs.update({"u1": [g[0], g[10], "z"], "u2": [g[5], g[15], "z"], "u4": ["r1", "z", "r2"]})
    _write_seq_txt(tmp_path / "d", seqs)
    cfg = _cfg(tmp_path, tmp_path / "d", "data.k_core=3", "data.cold_users=none")
    out = prep.prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["k_core_iterations"] >= 2
    p = Prepared(out)
    assert sorted(p.items["raw_id"]) == g
    assert p.n_train_users == 30
    assert not {"u1", "u2", "u4"} & set(p.users["raw_id"])
    for s in p.sequences["seq"]:
        assert len(s) == 3
    # single-pass check: every surviving item has >= k interactions and every user >= k items
    counts = np.bincount(np.concatenate(p.sequences["seq"].to_numpy()))
    assert counts[1:].min() >= 3


def _real_like(tmp_path: Path, n_users: int = 60, n_items: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    seqs = {f"user{u:03d}": [f"i{x:03d}" for x in rng.choice(n_items, size=rng.integers(6, 15), replace=False)]
            for u in range(n_users)}
    _write_seq_txt(tmp_path / "d", seqs)
    return tmp_path / "d"


def test_splits_and_candidates(ray_session, tmp_path):
    d = _real_like(tmp_path)
    out = prep.prepare(_cfg(tmp_path, d, "data.k_core=2", "data.cold_users=holdout",
                            "data.cold_user_fraction=0.2", "data.fewshot_k=[8,16]"))
    p = Prepared(out)
    seqs = dict(zip(p.sequences["user"], p.sequences["seq"]))
    for split, cut in (("valid", 2), ("test", 1)):
        c = p.candidates(split)
        assert len(c) == p.n_train_users
        for u, t, negs, hist in zip(c["user"], c["target"], c["negatives"], c["history"]):
            s = list(seqs[u])
            assert t == s[-cut] and list(hist) == s[:-cut]
            cands = [t, *negs]
            assert len(cands) == 20 and len(set(cands)) == 20
            assert not set(negs) & set(s), "a negative is in the user's history"
            assert min(cands) >= 1 and max(cands) <= p.n_items
    cold = p.candidates("cold_users")
    assert len(cold) > 0 and all(len(h) == 2 for h in cold["history"])
    cold_ids = set(p.users.loc[p.users["cold_user"], "user"])
    assert cold_ids == set(cold["user"]) and not cold_ids & set(seqs)
    assert min(cold_ids) == p.n_train_users  # cold users get ids after all training users
    fs = p.fewshot
    small, big = set(fs.loc[fs.k == 8, "user"]), set(fs.loc[fs.k == 16, "user"])
    assert len(small) == 8 and len(big) == 16 and small <= big and not big & cold_ids


def test_candidates_identical_across_runs_and_block_counts(ray_session, tmp_path, monkeypatch):
    d = _real_like(tmp_path, n_users=80)
    out1 = prep.prepare(_cfg(tmp_path / "a", d, "data.k_core=2"))
    c1 = Prepared(out1).candidates("test")
    monkeypatch.setattr(prep, "_num_blocks", lambda n_rows: 7)
    out2 = prep.prepare(_cfg(tmp_path / "b", d, "data.k_core=2"))
    c2 = Prepared(out2).candidates("test")
    assert c1["user"].tolist() == c2["user"].tolist()
    assert [list(x) for x in c1["negatives"]] == [list(x) for x in c2["negatives"]]
    # a different seed gives different negatives
    out3 = prep.prepare(_cfg(tmp_path / "c", d, "data.k_core=2", "seed=7"))
    c3 = Prepared(out3).candidates("test")
    assert [list(x) for x in c1["negatives"]] != [list(x) for x in c3["negatives"]]


def test_rerun_is_reused_and_failure_mid_write_leaves_nothing_half_written(ray_session, tmp_path, monkeypatch):
    d = _real_like(tmp_path)
    cfg = _cfg(tmp_path, d, "data.k_core=2")
    out = prep.prepare(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prep.prepare(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # reused

    calls = {"n": 0}
    real_write = prep._write_ray

    def failing_write(ds, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure mid-write")
        real_write(ds, path)

    monkeypatch.setattr(prep, "_write_ray", failing_write)
    with pytest.raises(RuntimeError, match="injected"):
        prep.prepare(cfg, force=True)
    # the previous complete output is untouched and no temporary folder is left behind
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in out.parent.iterdir()] == ["data"]


def test_malformed_rows_are_counted_not_fatal(ray_session, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    rng = np.random.default_rng(1)
    for u in range(30):
        for j, i in enumerate(rng.choice(40, 8, replace=False)):
            rows.append(f"u{u}\ti{i}\t{rng.integers(1, 6)}\t{1000 + j}")
    rows += ["u1\ti1\tnot-a-number\t5", "only-two\tcolumns", "u2\t\t3\t7"]
    (d / "toy.inter").write_text("\n".join(rows) + "\n")
    (d / "toy.item").write_text("item_id:token\tmovie_title:token_seq\n" + "".join(f"i{i}\tMovie {i}\n" for i in range(40)))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=recbole", f"data.path={d}",
                             "data.k_core=2", "data.rating_threshold=2"])
    out = prep.prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in m["dropped_rows"].items() if k != "rating_filter"} == {
        "header": 1, "bad_rating": 1, "bad_columns": 1, "missing_item": 1}
    assert m["dropped_rows"]["rating_filter"] > 0
    assert m["counts"]["rows_valid"] == 240
    inter, items = m["input_lines"]
    assert (inter["lines"], inter["kept"], inter["first_line"]) == (244, 240, {"header": 1, "bad_rating": 242,
                                                                                "bad_columns": 243, "missing_item": 244})
    assert (items["lines"], items["kept"], items["dropped"]) == (41, 40, {"header": 1})


def test_scientific_five_core_counts(ray_session, shared_data, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=seq_json",
                             f"data.path={shared_data / 'amazon-scientific'}", "data.k_core=5"])
    m = json.loads((prep.prepare(cfg) / "manifest.json").read_text())
    c = m["counts"]
    assert (c["k_core_users"], c["items"], c["k_core_interactions"]) == (8317, 4344, 58492)
    assert c["cold_user_rule"] == "holdout" and c["cold_users"] > 0
    inter, items = m["input_lines"]  # whole-file JSON: the unit is the record (a user, an item)
    assert inter["unit"] == "record" and inter["dropped"] == {} and inter["lines"] == inter["kept"]
    assert (items["lines"], items["kept"]) == (4344, 4344)
    assert m["text_coverage"]["items_with_title"] == 4344


# --- raw Amazon 2018 dumps with planted garbage: every line accounted for ------------------------

def _review(user: str, asin: str, rating: float, ts: int) -> str:
    """One review line in the exact Amazon 2018 layout (key order and fields of the published dumps)."""
    day = time.strftime("%m %d, %Y", time.gmtime(ts))
    return json.dumps({"overall": rating, "verified": True, "reviewTime": day.lstrip("0"), "reviewerID": user,
                       "asin": asin, "style": {"Size:": " Large"}, "reviewerName": f"name of {user}",
                       "reviewText": "Works as described.", "summary": "Five Stars", "unixReviewTime": ts})


def _meta(asin: str, title: str, description: list[str]) -> str:
    return json.dumps({"category": ["Toys & Games", "Puzzles"], "tech1": "", "description": description,
                       "fit": "", "title": title, "also_buy": [], "tech2": "", "brand": "Acme", "feature": [],
                       "rank": "1,234 in Toys & Games (", "also_view": [], "main_cat": "Toys & Games",
                       "similar_item": "", "date": "", "price": "$9.99", "asin": asin, "imageURL": [],
                       "imageURLHighRes": []})


# planted in the reviews file, by the reason the report must give (blank and whitespace-only lines are empty)
BAD_REVIEWS = {
    "empty_line": ["", "", "   ", "\t"],
    "bad_json": ['{"overall": 5.0, "reviewerID": "AX", "asin": "B1"', "this is not json", "[1, 2, 3]",
                 '"a string"'],
    "missing_user": ['{"overall": 5.0, "asin": "T000", "unixReviewTime": 1500000000}',
                     '{"overall": 5.0, "reviewerID": "", "asin": "T000", "unixReviewTime": 1500000000}'],
    "missing_item": ['{"overall": 5.0, "reviewerID": "AU00", "unixReviewTime": 1500000000}'],
    "bad_rating": ['{"overall": "five", "reviewerID": "AU00", "asin": "T000", "unixReviewTime": 1500000000}'],
    "bad_timestamp": ['{"overall": 5.0, "reviewerID": "AU00", "asin": "T000", "unixReviewTime": "soon"}'],
    "missing_timestamp": ['{"overall": 5.0, "reviewerID": "AU00", "asin": "T000"}'],
}
BAD_META = {
    "empty_line": ["", " "],
    "bad_json": ["{'asin': 'T001', 'title': ", "<html>not a record</html>", "null"],
    "missing_item": ['{"title": "no asin at all", "description": []}'],
}


def _write_amazon_dump(folder: Path, n_users: int = 40, n_items: int = 30, untitled: int = 1,
                       seed: int = 0) -> dict:
    """reviews_Toys_5.json.gz + meta_Toys.json.gz (gzip, Amazon 2018 layout) with the garbage above
    spread through both files; returns the exact counts the line report must give."""
    rng = np.random.default_rng(seed)
    good = []
    for u in range(n_users):
        for j, i in enumerate(rng.choice(n_items, size=6, replace=False)):
            good.append(_review(f"AU{u:02d}", f"T{i:03d}", float(rng.integers(1, 6)), 1_500_000_000 + 86_400 * j))
    good.append(good[0])  # an exact duplicate: a kept line, removed later by the dedupe
    bad = [(reason, line) for reason, lines in BAD_REVIEWS.items() for line in lines]
    lines = list(good)
    for k, (_, line) in enumerate(bad):  # garbage at the start, in the middle and at the end
        lines.insert(min(len(lines), 7 * k), line)
    meta_good = [_meta(f"T{i:03d}", "" if i < untitled else f"Puzzle number {i}",
                       [f"A {i}-piece puzzle."] if i % 3 else []) for i in range(n_items)]
    meta_good.append(_meta("Z999", "An item nobody reviewed", []))
    meta_lines = list(meta_good)
    for k, line in enumerate(line for lines_ in BAD_META.values() for line in lines_):
        meta_lines.insert(min(len(meta_lines), 5 * k + 1), line)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reviews_Toys_5.json.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    (folder / "meta_Toys.json.gz").write_bytes(gzip.compress(("\n".join(meta_lines) + "\n").encode()))
    return {"reviews": {"lines": len(lines), "kept": len(good),
                        "dropped": {r: len(v) for r, v in BAD_REVIEWS.items()}},
            "meta": {"lines": len(meta_lines), "kept": len(meta_good),
                     "dropped": {r: len(v) for r, v in BAD_META.items()}},
            "first_bad_review_line": {r: 1 + min(i for i, ln in enumerate(lines) if ln in v and ln not in good)
                                      for r, v in BAD_REVIEWS.items()}}


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from pipelines.cli import main
    rc = main(["prepare", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _amazon_args(tmp_path: Path, raw: Path, *extra: str) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", "data.format=amazon2018", f"data.path={raw}", "data.k_core=2",
            "ray.num_cpus=4", "ray.progress=false", *extra]


def test_amazon_dump_every_line_accounted_for_and_title_coverage(ray_session, tmp_path, capsys, caplog):
    """The user path (`allmrec prepare`) on a raw Amazon 2018 dump with planted garbage in both files:
    every line is kept or dropped for its reason, exactly; 2 of 30 items without a title (6.7%) is refused
    at the default 5% and accepted with the override."""
    raw = tmp_path / "raw"
    want = _write_amazon_dump(raw, untitled=2)
    # the metadata as plain text under a .gz name: read by its content, not its name (with a warning)
    meta = raw / "meta_Toys.json.gz"
    meta.write_bytes(gzip.decompress(meta.read_bytes()))
    rc, out, err = _cli(capsys, *_amazon_args(tmp_path, raw))
    assert rc == 1 and not (tmp_path / "run" / "data").exists()
    msg = [ln for ln in err.splitlines() if ln.strip()]
    assert msg == [msg[-1]] and msg[0].startswith("allmrec prepare: error: 2 of 30 items (6.7%) have no title "
                                                  "in meta_Toys.json.gz") and "max_missing_title_fraction=1" in msg[0]
    assert "is named .gz but is not gzip-compressed" in caplog.text

    rc, out, err = _cli(capsys, *_amazon_args(tmp_path, raw, "data.max_missing_title_fraction=0.1"))
    assert rc == 0, err
    m = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    reviews, metadata = m["input_lines"]
    assert Path(reviews["file"]).name == "reviews_Toys_5.json.gz" and reviews["kind"] == "interactions"
    for got, exp in ((reviews, want["reviews"]), (metadata, want["meta"])):
        assert (got["lines"], got["kept"], got["dropped"]) == (exp["lines"], exp["kept"], exp["dropped"])
        assert got["lines"] == got["kept"] + sum(got["dropped"].values())
    assert reviews["first_line"] == want["first_bad_review_line"]
    assert (tmp_path / "raw" / "reviews_Toys_5.json.gz").read_bytes()[:2] == b"\x1f\x8b"
    n_lines = len(gzip.decompress((raw / "reviews_Toys_5.json.gz").read_bytes()).split(b"\n")) - 1
    assert reviews["lines"] == n_lines and metadata["lines"] == len(meta.read_bytes().split(b"\n")) - 1
    assert m["dropped_rows"] == want["reviews"]["dropped"]
    assert m["counts"]["duplicates_removed"] == 1
    assert m["text_coverage"] == {"items": 30, "items_in_metadata": 30, "items_with_title": 28,
                                  "items_with_description": 20}
    # the console: the coverage line and one table row per file and per reason
    assert "item text from metadata: title 28 (93.3%), description 20 (66.7%) of 30 items" in out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ")}
    assert rows["reviews_Toys_5.json.gz"][1:] == [f"{want['reviews']['lines']:,}", f"{want['reviews']['kept']:,}",
                                                  f"{sum(want['reviews']['dropped'].values()):,}"]
    assert rows["meta_Toys.json.gz"][1:4] == ["37", "31", "6"]
    assert rows["missing_timestamp"][:4] == ["1", "first", "at", "line"]


def test_metadata_that_matches_no_item_is_refused(ray_session, tmp_path, capsys):
    raw = tmp_path / "raw"
    _write_amazon_dump(raw)
    other = [_meta(f"X{i:03d}", f"Other item {i}", []) for i in range(30)]  # another category's metadata
    (raw / "meta_Toys.json.gz").write_bytes(gzip.compress(("\n".join(other) + "\n").encode()))
    rc, _, err = _cli(capsys, *_amazon_args(tmp_path, raw))
    assert rc == 1 and not (tmp_path / "run" / "data").exists()
    assert "30 of 30 items (100.0%) have no title in meta_Toys.json.gz (0 found in it at all)" in err


def _bad_file_cases(raw: Path) -> dict[str, tuple[Path, bytes, str]]:
    """file -> (what to write there, the error it must give) for files each unusable in its own way."""
    reviews, meta = raw / "reviews_Toys_5.json.gz", raw / "meta_Toys.json.gz"
    good = gzip.decompress(reviews.read_bytes())
    lines_2023 = b"".join(b'{"rating": 5.0, "parent_asin": "B%d", "user_id": "U1", "timestamp": 1588687728923}\n'
                          % i for i in range(5))
    return {
        "empty": (reviews, b"", r"reviews_Toys_5.json.gz: the file is empty \(0 bytes\)"),
        "blank lines only": (reviews, gzip.compress(b"\n\n  \n"), r"reviews_Toys_5.json.gz: the file holds no data "
                                                                   r"\(3 blank lines\)"),
        "all garbage": (reviews, gzip.compress(b"\n".join([b"oops", b"", b"<html>", b"{}"]) + b"\n"),
                        r"reviews_Toys_5.json.gz line 1: bad_json \(starts 'oops'\); none of its 3 non-blank lines "
                        r"is a usable amazon2018 review record"),
        "truncated in its head": (reviews, gzip.compress(good)[:300],
                                  r"reviews_Toys_5.json.gz: unreadable after line [0-9]+ \(EOFError: Compressed file "
                                  r"ended before the end-of-stream marker was reached\): the gzip stream is truncated"),
        "bzip2 named .gz": (reviews, __import__("bz2").compress(good), r"reviews_Toys_5.json.gz: the file is "
                                                                      r"bzip2-compressed"),
        "2023 format under amazon2018": (reviews, gzip.compress(lines_2023),
                                         r"reviews_Toys_5.json.gz line 1: missing_user .* is data.format right"),
        "empty metadata": (meta, gzip.compress(b""), r"meta_Toys.json.gz: the file holds no data \(0 blank lines\)"),
        "not JSON lines": (meta, gzip.compress(b"asin,title\nB1,Lamp\nB2,Rope\n"),
                           r"meta_Toys.json.gz line 1: bad_json \(starts 'asin,title'\); none of its 3 non-blank "
                           r"lines is a usable amazon2018 metadata record"),
    }


def test_bad_files_give_one_line_naming_the_file(tmp_path, capsys):
    """Each unusable file: exit 1, one line on stderr naming it (and the line), before Ray starts,
    nothing written. In process (these fail before Ray); the console path is checked once below."""
    raw = tmp_path / "raw"
    _write_amazon_dump(raw)
    originals = {p: p.read_bytes() for p in raw.iterdir()}
    for case, (path, data, pattern) in _bad_file_cases(raw).items():
        path.write_bytes(data)
        rc, out, err = _cli(capsys, *_amazon_args(tmp_path, raw))
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1, (case, err)
        assert re.search(pattern, lines[0]) and lines[0].startswith("allmrec prepare: error: "), (case, lines[0])
        assert str(path) in lines[0], case
        assert not (tmp_path / "run" / "data").exists(), case
        path.write_bytes(originals[path])


def test_bad_file_on_the_console(tmp_path):
    """The real command line: a truncated download gives exit 1 and one stderr line, no traceback."""
    import subprocess
    import sys
    raw = tmp_path / "raw"
    _write_amazon_dump(raw)
    (raw / "reviews_Toys_5.json.gz").write_bytes(gzip.compress(b'{"overall": 5.0}\n' * 50)[:40])
    exe = Path(sys.executable).with_name("allmrec")
    r = subprocess.run([str(exe), "prepare", *_amazon_args(tmp_path, raw)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "Traceback" not in r.stderr
    assert re.search(r"reviews_Toys_5.json.gz: unreadable after line [0-9]+ \(EOFError", r.stderr), r.stderr


def test_truncated_gzip_past_its_head_is_named_by_the_parallel_read(ray_session, tmp_path, capsys):
    """A download cut off after the lines the pre-check reads: the Ray read reports the file and the line
    where the stream broke (one line, exit 1), instead of a read task's traceback."""
    raw = tmp_path / "raw"
    _write_amazon_dump(raw, n_users=200)  # 1,200+ lines: far past the pre-check's head
    reviews = raw / "reviews_Toys_5.json.gz"
    data = reviews.read_bytes()
    reviews.write_bytes(data[: int(len(data) * 0.7)])
    complete = zlib.decompressobj(wbits=31).decompress(reviews.read_bytes()).count(b"\n")
    assert complete > prep.readers.HEAD_LINES
    rc, _, err = _cli(capsys, *_amazon_args(tmp_path, raw))
    lines = [ln for ln in err.splitlines() if ln.strip() and "allmrec prepare" in ln]
    assert rc == 1 and len(lines) == 1, err
    assert (f"reviews_Toys_5.json.gz: EOFError: the gzip stream ends before its end marker (truncated) at line "
            f"{complete + 1:,} (after {complete:,} complete lines): the file is truncated or corrupt") in lines[0]
    assert "Traceback" not in err and not (tmp_path / "run" / "data").exists()


def test_a_file_without_a_usable_line_past_the_head_check_is_refused():
    """_reports_from (the full read's accounting): a file whose every line was dropped is an error naming
    it with the reasons and the first line of each; a line without an outcome is a bug, not a report."""
    import pyarrow as pa
    t = pa.table({"file": pa.array([0, 0, 1], pa.int32()), "outcome": ["", "bad_json", "empty_line"],
                  "partial": [False, False, False], "n": [5, 2, 300], "first_line": [1, 3, 1],
                  "last_line": [7, 6, 300]})
    with pytest.raises(prep.readers.InputError, match=r"b.json: none of its 300 lines is a usable metadata record "
                                                      r"\(empty_line 300 \(first at line 1\)\)"):
        prep._reports_from([t], ["a.json", "b.json"], "metadata", "line")
    ok = prep._reports_from([t.slice(0, 2)], ["a.json"], "interactions", "line")
    assert ok[0].to_dict() == {"file": "a.json", "kind": "interactions", "unit": "line", "lines": 7, "kept": 5,
                               "dropped": {"bad_json": 2}, "first_line": {"bad_json": 3}}
    gap = t.slice(0, 2).set_column(5, "last_line", pa.array([9, 6]))
    with pytest.raises(RuntimeError, match="covers 7 of 9 lines"):
        prep._reports_from([gap], ["a.json"], "interactions", "line")


def test_parallel_reader_gunzips_by_content_every_member_and_names_breaks():
    import io

    def read(data: bytes, chunk: int = 7) -> bytes:
        return b"".join(prep._decompressed(io.BytesIO(data), chunk))

    a, b = b"line 1\nline 2\n", b"line 3\n"
    assert read(a + b) == a + b  # plain text passes through
    assert read(gzip.compress(a) + gzip.compress(b)) == a + b  # concatenated gzip members (like `cat *.gz`)
    whole = gzip.compress(a * 100)
    with pytest.raises(EOFError, match="truncated"):
        read(whole[: len(whole) // 2])
    corrupt = whole[:20] + bytes(x ^ 0xFF for x in whole[20:40]) + whole[40:]
    with pytest.raises(zlib.error):
        read(corrupt)


def test_eval_rows_cap_cold_users_apart_from_test_users(ray_session, tmp_path):
    """eval.max_cold_users caps the cold-user scenario on its own (None: as eval.max_users; 0: none)."""
    from pipelines.evaluate import eval_rows
    d = _real_like(tmp_path)
    args = ["data.k_core=2", "data.cold_users=holdout", "data.cold_user_fraction=0.2", "eval.max_users=6"]
    p = Prepared(prep.prepare(_cfg(tmp_path, d, *args)))
    n_cold = len(p.candidates("cold_users"))
    assert n_cold > 6

    def counts(*extra):
        rows = eval_rows(_cfg(tmp_path, d, *args, *extra), p)
        return (rows.scenario == "overall").sum(), (rows.scenario == "cold_users").sum()

    assert counts() == (6, 6)
    assert counts("eval.max_cold_users=3") == (6, 3)
    assert counts("eval.max_cold_users=0") == (6, 0)
    assert counts("eval.max_cold_users=100000") == (6, n_cold)
    from allmrec.config import ConfigError
    with pytest.raises(ConfigError, match="max_cold_users"):
        _cfg(tmp_path, d, "eval.max_cold_users=-1")
