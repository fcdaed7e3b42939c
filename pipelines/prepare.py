"""`allmrec prepare`: raw interactions + metadata -> the prepared parquet files (allmrec/data/schema.py).

Ray Data end to end: interaction rows and user rows stay distributed in the object store; the driver
only ever holds per-id aggregates (item counts, the sorted id vocabularies, item metadata of kept items).

  read/parse -> count malformed rows -> rating filter -> hash-partition by user -> dedupe + sequences
  -> (exact-3 cold users set aside) -> iterative k-core -> id maps -> seeded holdout/candidates -> write
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from allmrec.config import Config
from allmrec.data import readers, schema, text
from allmrec.data.sampling import STREAM_FEWSHOT, stable_hash
from allmrec.data.sequences import (build_user_outputs, drop_items, group_user_sequences, holdout_mask,
                                    item_counts, popularity_groups, to_int_ids)
from allmrec.io import Timer, atomic_dir, file_digest, fingerprint, is_complete, read_manifest
from allmrec.artifacts import RunFolder
from pipelines.common import init_ray

log = logging.getLogger("allmrec.prepare")


# ---------------------------------------------------------------- reading

_TEXT_COLS = ("user", "item", "title", "description", "categories", "error")


def _line_files_datasource(paths: list[str], batch_lines: int = 65536):
    """A Ray Data datasource of the lines of text files, gzip sniffed by its magic bytes (not its name).

    Rows: text, line (1-based number in its file), path, read_error (null; set on one extra row
    when the stream breaks, e.g. a truncated gzip: the read task does not fail, so the driver
    can name the file and line in one sentence instead of a task traceback). Lines end at "\n" only,
    as in the in-process reader (readers.open_text). Built lazily: Ray is imported by the caller.
    """
    from ray.data.datasource import FileBasedDatasource

    class LineFiles(FileBasedDatasource):
        def _open_input_source(self, filesystem, path, **open_args):
            # the raw bytes (pyarrow would pick the codec by the name); _read_stream gunzips by the magic
            return filesystem.open_input_stream(path, compression=None)

        def _read_stream(self, f, path: str):
            texts: list[str] = []
            start, rest, error = 1, b"", None

            def block(err=None):
                n = len(texts) + (err is not None)
                return pa.table({"text": pa.array(texts + ([""] if err is not None else []), pa.string()),
                                 "line": pa.array(np.arange(start, start + n, dtype=np.int64)),
                                 "path": pa.array([path] * n, pa.string()),
                                 "read_error": pa.array([None] * len(texts) + ([err] if err is not None else []),
                                                        pa.string())})
            try:
                # zlib by hand, not a gzip stream: what was decompressed before a truncation or a corrupt
                # byte still arrives, so the error row gets the right line number
                for chunk in _decompressed(f):
                    parts = (rest + chunk).split(b"\n")
                    rest = parts.pop()
                    texts.extend(x.decode("utf-8", "replace") for x in parts)
                    if len(texts) >= batch_lines:
                        yield block()
                        start += len(texts)
                        texts = []
                if rest:
                    texts.append(rest.decode("utf-8", "replace"))
            except Exception as e:  # noqa: BLE001 - any broken stream becomes one row the driver reports
                error = readers.short_error(e)  # the cut-off line (`rest`) is not a line: this row stands for it
            yield block(error)

    return LineFiles(paths)


def _decompressed(f, chunk: int = 1 << 22):
    """The bytes of file object `f`, gunzipped (every gzip member) when they start with the gzip magic.
    Raises EOFError when the gzip data ends early, zlib.error when it is corrupt."""
    import zlib
    data = f.read(chunk)
    if data[:2] != readers.GZIP_MAGIC:
        while data:
            yield data
            data = f.read(chunk)
        return
    d = zlib.decompressobj(wbits=31)
    while data:
        out = d.decompress(data)
        if out:
            yield out
        while d.eof and d.unused_data:  # a multi-member gzip file (concatenated members)
            tail = d.unused_data
            d = zlib.decompressobj(wbits=31)
            out = d.decompress(tail)
            if out:
                yield out
        data = f.read(chunk)
    if not d.eof:
        raise EOFError("the gzip stream ends before its end marker (truncated)")


def _parse_lines_batch(batch: pa.Table, fmt: str, header: list[str] | None, kind: str,
                       file_index: dict[str, int]) -> dict:
    lines = batch["text"].to_pylist()
    line_no = batch["line"].to_numpy()
    read_err = batch["read_error"].to_pylist()
    if kind == "inter":
        out = readers.parse_interaction_lines(fmt, lines, header=header)
    else:
        out = readers.parse_meta_lines(fmt, lines, header=header)
    src = np.asarray(out.pop("src"), dtype=np.int64)
    err = out["error"]
    for i, s in enumerate(src):  # the row standing for a broken stream carries its error
        if read_err[s] is not None:
            err[i] = f"unreadable: {read_err[s]}"
    cols = {k: np.asarray(v, dtype=object) if k in _TEXT_COLS else np.asarray(v, dtype=np.float64)
            for k, v in out.items()}
    paths = batch["path"].to_pylist()
    cols["line"] = line_no[src] if len(src) else np.zeros(0, np.int64)
    cols["file"] = np.asarray([_file_of(paths[s], file_index) for s in src], dtype=np.int32)
    cols["first"] = np.asarray(readers.first_rows(src.tolist()), dtype=bool)
    return cols


def _file_of(path: str, file_index: dict[str, int]) -> int:
    """The input file index of a path as Ray Data reports it (resolved, maybe with a scheme)."""
    i = file_index.get(path)
    if i is None:
        i = file_index.get(str(Path(path.split("://", 1)[-1]).resolve()), -1)
    return i


def _parse_whole_file(batch: dict, kind: str, file_index: dict[str, int]) -> dict:
    out: dict[str, list] = {}
    for data, path in zip(batch["bytes"], batch["path"]):
        txt = bytes(data).decode("utf-8", "replace")
        part = readers.parse_seq_json(txt) if kind == "inter" else readers.parse_seq_json_items(txt)
        src = part.pop("src")
        part["line"] = [s + 1 for s in src]
        part["file"] = [_file_of(str(path), file_index)] * len(src)
        part["first"] = readers.first_rows(src)
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    dtypes = {"line": np.int64, "file": np.int32, "first": bool}
    return {k: np.asarray(v, dtype=object) if k in _TEXT_COLS else np.asarray(v, dtype=dtypes.get(k, np.float64))
            for k, v in out.items()}


def _read(ray, fmt: str, files: list[str], line_based: bool, kind: str):
    if not files:
        return None
    file_index = {str(Path(f).resolve()): i for i, f in enumerate(files)}
    if line_based:
        header = readers.read_recbole_header(files[0]) if fmt == "recbole" else None
        ds = ray.data.read_datasource(_line_files_datasource(files))
        return ds.map_batches(_parse_lines_batch, fn_kwargs={"fmt": fmt, "header": header, "kind": kind,
                                                             "file_index": file_index},
                              batch_format="pyarrow", batch_size=8192)
    ds = ray.data.read_binary_files(files, include_paths=True)
    return ds.map_batches(_parse_whole_file, fn_kwargs={"kind": kind, "file_index": file_index},
                          batch_format="numpy", batch_size=1)


def _line_accounting(block: pa.Table) -> pa.Table:
    """Per (file, outcome): lines and the first line number (outcome "" = kept); plus partial drops."""
    import pyarrow.compute as pc
    first = block["first"]
    t = pa.table({"file": block["file"], "outcome": pc.fill_null(block["error"].cast(pa.string()), ""),
                  "line": block["line"], "partial": pc.invert(first)})
    # the first row of a line decides its outcome; later rows with an error are partial drops (seq_json)
    t = t.filter(pc.or_(first, pc.not_equal(t["outcome"], "")))
    if t.num_rows == 0:
        return pa.table({"file": pa.array([], pa.int32()), "outcome": pa.array([], pa.string()),
                         "partial": pa.array([], pa.bool_()), "n": pa.array([], pa.int64()),
                         "first_line": pa.array([], pa.int64()), "last_line": pa.array([], pa.int64())})
    g = t.group_by(["file", "outcome", "partial"], use_threads=False).aggregate(
        [("line", "count"), ("line", "min"), ("line", "max")])
    return pa.table({"file": g["file"], "outcome": g["outcome"].cast(pa.string()), "partial": g["partial"],
                     "n": g["line_count"], "first_line": g["line_min"], "last_line": g["line_max"]})


def _file_reports(ray, ds, files: list[str], kind: str, unit: str) -> list[readers.FileReport]:
    """One FileReport per input file from the parsed dataset (see _reports_from)."""
    parts = ds.map_batches(_line_accounting, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    return _reports_from(ray.get(parts), files, kind, unit)


def _reports_from(tables: list[pa.Table], files: list[str], kind: str, unit: str) -> list[readers.FileReport]:
    """Sum _line_accounting tables into one FileReport per file; raise InputError for a file whose
    stream broke or that holds no usable line, RuntimeError if a line went unaccounted."""
    reports = [readers.FileReport(f, kind, unit) for f in files]
    last = [0] * len(files)
    for t in tables:
        for f, outcome, partial, n, first, end in zip(*(t[c].to_pylist() for c in
                                                        ("file", "outcome", "partial", "n", "first_line",
                                                         "last_line"))):
            if f < 0:
                raise RuntimeError(f"prepare: rows of an unknown input file (known: {files})")
            rep = reports[f]
            last[f] = max(last[f], end)
            if partial:
                rep.partial[outcome] = rep.partial.get(outcome, 0) + n
            else:
                rep.add(outcome or None, n, first)
    for rep, end in zip(reports, last):
        for reason, line in rep.first_line.items():
            if reason.startswith("unreadable"):
                raise readers.InputError(f"{rep.path}: {reason[len('unreadable: '):]} at line {line:,} "
                                         f"(after {line - 1:,} complete lines): the file is truncated or corrupt; "
                                         "download it again")
        if rep.lines != end:  # lines are numbered 1..end: every one must have an outcome
            raise RuntimeError(f"prepare: line accounting of {rep.path} covers {rep.lines:,} of {end:,} lines")
        if rep.kept == 0:
            what = "review / interaction" if kind == "interactions" else "metadata"
            reasons = ", ".join(f"{r} {n:,} (first at {unit} {rep.first_line[r]:,})" for r, n in
                                sorted(rep.dropped.items(), key=lambda kv: -kv[1]))
            raise readers.InputError(f"{rep.path}: none of its {rep.lines:,} {unit}s is a usable {what} record "
                                     f"({reasons or 'no lines'}): is data.format right, and is this the right file?")
    return reports


def _sum_counts(ds, fn, key: str = "item", **kwargs) -> dict:
    """Run a partial-count block function over `ds` and sum the partial counts in the driver."""
    parts = ds.map_batches(fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    import ray
    total: Counter = Counter()
    for t in ray.get(parts):
        if t.num_rows:
            total.update(dict(zip(t[key].to_pylist(), t["count"].to_pylist())))
    return dict(total)


def _error_counts(block: pa.Table) -> pa.Table:
    import pyarrow.compute as pc
    errs = block["error"].drop_null() if block.num_rows else pa.array([], pa.string())
    if len(errs) == 0:
        return pa.table({"error": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    vc = pc.value_counts(errs).flatten()
    return pa.table({"error": vc[0].cast(pa.string()), "count": vc[1]})


def _valid_rows(block: pa.Table, threshold: float | None) -> pa.Table:
    import pyarrow.compute as pc
    t = block.filter(pc.is_null(block["error"]))
    if threshold is not None:
        t = t.filter(pc.fill_null(pc.greater(t["rating"], threshold), False))
    return t.select(["user", "item", "rating", "ts"])


def _split_by_len(block: pa.Table, exact: int, want_exact: bool) -> pa.Table:
    import pyarrow.compute as pc
    lens = pc.list_value_length(block["items"])
    mask = pc.equal(lens, exact)
    return block.filter(mask if want_exact else pc.invert(mask))


def _counts_of_users(block: pa.Table) -> pa.Table:
    import pyarrow.compute as pc
    lens = pc.list_value_length(block["items"]).to_numpy(zero_copy_only=False)
    return pa.table({"item": pa.array(["users", "interactions", "duplicates"]),
                     "count": pa.array([len(lens), int(lens.sum()), int(pc.sum(block["n_dup"]).as_py() or 0)],
                                       pa.int64())})


# ---------------------------------------------------------------- the job

def prepare(cfg: Config, force: bool = False) -> Path:
    """Run the preparation job; returns the output folder `<run>/data`."""
    d = cfg.data
    out_dir = RunFolder(cfg).data
    timer = Timer()
    inputs = readers.resolve_inputs(d.format, d.path, d.category)
    for note in inputs.notes:
        log.info("prepare: %s", note)
    with timer("hash_inputs"):
        digests = [file_digest(p) for p in inputs.interactions + inputs.meta]
    fp = fingerprint({"inputs": digests, "data": cfg.to_dict()["data"], "seed": cfg.seed, "version": 2})
    if not force and is_complete(out_dir, fp):
        log.info("prepare: %s is up to date (same inputs and config); use --force to rebuild", out_dir)
        return out_dir
    # one clear error per unusable file before Ray starts (the full read catches what the head hides)
    with timer("check_inputs"):
        for kind, paths in (("interactions", inputs.interactions), ("metadata", inputs.meta)):
            for path in paths:
                note = readers.check_file(d.format, path, kind).note
                if note:
                    log.warning("prepare: %s", note)

    ray = init_ray(cfg)
    t_start = time.perf_counter()
    unit = "line" if inputs.line_based else "record"
    with timer("parse"):
        raw = _read(ray, d.format, inputs.interactions, inputs.line_based, "inter").materialize()
        reports = _file_reports(ray, raw, inputs.interactions, "interactions", unit)
        errors = _sum_counts(raw, _error_counts, key="error")
        n_rows = raw.count()
    kept = raw.map_batches(_valid_rows, fn_kwargs={"threshold": d.rating_threshold}, batch_format="pyarrow")
    n_valid = n_rows - sum(errors.values())
    if n_valid == 0:  # unreachable after _file_reports (a file without a usable line is an error there)
        raise readers.InputError(f"no usable interaction in {inputs.interactions}")

    with timer("sequences"):
        n_blocks = _num_blocks(n_valid)
        users_ds = (kept.repartition(n_blocks, keys=["user"])
                    .map_batches(group_user_sequences, batch_size=None, batch_format="pyarrow")
                    .materialize())
        stats = _sum_counts(users_ds, _counts_of_users)
    n_after_rating = stats.get("interactions", 0) + stats.get("duplicates", 0)
    if n_after_rating == 0:
        raise readers.InputError(f"none of the {n_valid:,} usable interactions of {inputs.interactions} has a rating "
                                 f"above data.rating_threshold={d.rating_threshold}")

    # cold users "exact3": users with exactly 3 interactions are set aside before the k-core so they
    # neither shape it nor appear in any training file.
    rule = d.cold_users
    exact3_ds = None
    if rule in ("auto", "exact3"):
        exact3_ds = users_ds.map_batches(_split_by_len, fn_kwargs={"exact": 3, "want_exact": True},
                                         batch_format="pyarrow").materialize()
        n_exact3 = exact3_ds.count()
        if rule == "auto":
            rule = "exact3" if n_exact3 > 0 else "holdout"
        if rule == "exact3":
            users_ds = users_ds.map_batches(_split_by_len, fn_kwargs={"exact": 3, "want_exact": False},
                                            batch_format="pyarrow").materialize()

    with timer("k_core"):
        k = d.k_core
        min_len = max(k, 3)  # train/valid/test need three interactions
        iterations = 0
        # drop users that are already too short, so every user row satisfies the length bound below
        users_ds = users_ds.map_batches(drop_items, fn_kwargs={"bad": pa.array([], pa.string()),
                                                               "min_len": min_len}, batch_format="pyarrow")
        while True:  # to a fixed point: removing items can shorten users, removing users can thin items
            counts = _sum_counts(users_ds, item_counts)
            bad = [i for i, c in counts.items() if c < k]
            if not bad:
                break
            iterations += 1
            users_ds = users_ds.map_batches(drop_items, fn_kwargs={"bad": pa.array(bad, pa.string()),
                                                                   "min_len": min_len},
                                            batch_format="pyarrow").materialize()
            log.info("k-core iteration %d: removed %d items below %d interactions", iterations, len(bad), k)
        item_vocab = pa.array(sorted(counts), pa.string())
    n_items = len(item_vocab)
    if n_items == 0:
        raise ValueError(f"no item survives the {k}-core of {inputs.interactions}: lower data.k_core")
    if n_items < d.n_negatives + min_len:
        raise ValueError(f"only {n_items} items after the k-core: too few to draw {d.n_negatives} negatives "
                         "per user (lower data.n_negatives or data.k_core)")

    with timer("ids_and_candidates"):
        reg_users = sorted(users_ds.select_columns(["user"]).to_pandas()["user"].tolist())
        cold_list: list[str] = []
        if rule == "holdout":
            mask = holdout_mask(reg_users, cfg.seed, d.cold_user_fraction)
            cold_list = [u for u, m in zip(reg_users, mask) if m]
            reg_users = [u for u, m in zip(reg_users, mask) if not m]
        elif rule == "exact3" and exact3_ds is not None:
            # their items must exist in the kept catalogue; keep those that still have 3
            exact3_ds = exact3_ds.map_batches(_keep_known_items, fn_kwargs={"vocab": item_vocab},
                                              batch_format="pyarrow").materialize()
            cold_list = sorted(exact3_ds.select_columns(["user"]).to_pandas()["user"].tolist()) \
                if exact3_ds.count() else []
        # regular users get ids 0..R-1, cold users R..U-1 (so CF user tables cover training users only)
        user_vocab = pa.array(reg_users + sorted(cold_list), pa.string())
        cold_set = set(cold_list)

        def ints(ds):
            return ds.map_batches(to_int_ids, fn_kwargs={"item_vocab": item_vocab, "user_vocab": user_vocab},
                                  batch_format="pyarrow")

        all_int = ints(users_ds)
        cold_arr = pa.array(sorted(cold_list), pa.string())
        regular = (all_int.map_batches(_filter_users, fn_kwargs={"users": cold_arr, "keep": False},
                                       batch_format="pyarrow") if rule == "holdout" else all_int)
        reg_out = regular.map_batches(build_user_outputs, batch_format="pyarrow", fn_kwargs=dict(
            n_items=n_items, n_negatives=d.n_negatives, seed=cfg.seed, cold=False)).materialize()
        cold_src = (all_int.map_batches(_filter_users, fn_kwargs={"users": cold_arr, "keep": True},
                                        batch_format="pyarrow") if rule == "holdout"
                    else ints(exact3_ds) if rule == "exact3" and cold_list else None)
        cold_out = (cold_src.map_batches(build_user_outputs, batch_format="pyarrow", fn_kwargs=dict(
            n_items=n_items, n_negatives=d.n_negatives, seed=cfg.seed, cold=True)).materialize()
                    if cold_src is not None else None)
        train_counts = _sum_counts(reg_out, item_counts, column="seq", skip_last=2)

    with timer("items"):
        items_tbl, coverage, meta_reports = _item_table(ray, cfg, inputs, item_vocab, train_counts, unit)
    reports += meta_reports
    _check_coverage(coverage, n_items, inputs.meta, d.max_missing_title_fraction)

    with timer("write"), atomic_dir(out_dir) as tmp:
        _write_ray(reg_out.select_columns(["user", "seq"]), tmp / schema.SEQUENCES)
        _write_ray(reg_out.map_batches(_candidates, fn_kwargs={"which": "valid"}, batch_format="pyarrow"),
                   tmp / schema.CAND_VALID)
        _write_ray(reg_out.map_batches(_candidates, fn_kwargs={"which": "test"}, batch_format="pyarrow"),
                   tmp / schema.CAND_TEST)
        if cold_out is not None:
            _write_ray(cold_out.map_batches(_candidates, fn_kwargs={"which": "test"}, batch_format="pyarrow"),
                       tmp / schema.COLD_USERS)
        else:
            pq.write_table(pa.table({"user": pa.array([], pa.int32()), "target": pa.array([], pa.int32()),
                                     "negatives": pa.array([], pa.list_(pa.int32())),
                                     "history": pa.array([], pa.list_(pa.int32()))}),
                           tmp / schema.COLD_USERS)
        pq.write_table(items_tbl, tmp / schema.ITEMS)
        pq.write_table(pa.table({"user": pa.array(np.arange(len(user_vocab), dtype=np.int32)),
                                 "raw_id": user_vocab,
                                 "cold_user": pa.array([u in cold_set for u in user_vocab.to_pylist()])}),
                       tmp / schema.USERS)
        pq.write_table(_fewshot(reg_users, d.fewshot_k, cfg.seed), tmp / schema.FEWSHOT)
        n_inter = int(sum(train_counts.values())) + 2 * len(reg_users)
        groups = items_tbl["group"].to_pylist()
        manifest = {
            "fingerprint": fp,
            "job": "prepare",
            "inputs": digests,
            "config": cfg.to_dict(),
            "counts": {
                "rows_read": n_rows,
                "rows_valid": n_valid,
                "interactions_after_rating_filter": n_after_rating,
                "duplicates_removed": stats["duplicates"],
                "k_core": k,
                "k_core_iterations": iterations,
                "k_core_users": len(reg_users) + (len(cold_list) if rule == "holdout" else 0),
                "k_core_interactions": int(sum(counts.values())),
                "users": len(reg_users),
                "items": n_items,
                "interactions": n_inter,
                "cold_users": len(cold_list),
                "cold_user_rule": rule,
                "warm_items": groups.count("warm"),
                "cold_items": groups.count("cold"),
                "items_without_title": n_items - coverage["items_with_title"],
            },
            # every line (record) of every input file: kept, or dropped for a reason (docs/guide.md)
            "input_lines": [r.to_dict() for r in reports],
            "text_coverage": coverage,
            # interaction rows dropped, by reason (a bad line's one row; empty lines included)
            "dropped_rows": errors | ({"rating_filter": int(n_valid - n_after_rating)}
                                      if d.rating_threshold is not None else {}),
            "timings_s": timer.phases | {"total": round(time.perf_counter() - t_start, 3)},
        }
        cfg.dump(tmp / "config.yaml")
        (tmp / schema.MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out_dir


def _num_blocks(n_rows: int) -> int:
    """Hash partitions for the per-user grouping: ~200k interactions each, at least 2."""
    return max(2, min(64, n_rows // 200_000 + 2))


def _keep_known_items(block: pa.Table, vocab: pa.Array) -> pa.Table:
    """Exact-3 cold users: drop items outside the kept catalogue, keep users that still have all 3."""
    import pyarrow.compute as pc
    flat = block["items"].combine_chunks().flatten()
    bad = flat.filter(pc.invert(pc.is_in(flat, value_set=vocab)))
    t = drop_items(block, bad, 3)
    return t.filter(pc.equal(pc.list_value_length(t["items"]), 3))


def _filter_users(block: pa.Table, users: pa.Array, keep: bool) -> pa.Table:
    import pyarrow.compute as pc
    m = pc.is_in(block["raw_user"], value_set=users)
    return block.filter(m if keep else pc.invert(m))


def _candidates(block: pa.Table, which: str) -> pa.Table:
    seqs = block["seq"].to_pylist()
    cut = 2 if which == "valid" else 1
    hist = [s[:-cut] for s in seqs]
    return pa.table({"user": block["user"], "target": block[f"{which}_target"],
                     "negatives": block[f"{which}_negatives"], "history": pa.array(hist, pa.list_(pa.int32()))})


def _write_ray(ds, path: Path) -> None:
    ds.write_parquet(str(path))


def _fewshot(users: list[str], ks: list[int], seed: int) -> pa.Table:
    """Nested seeded subsets of regular users: the first K users in a seeded order (ids are positions)."""
    order = sorted(range(len(users)), key=lambda i: stable_hash(f"{seed}:{STREAM_FEWSHOT}:{users[i]}"))
    rows_k, rows_u = [], []
    for k in sorted(ks):
        chosen = sorted(order[:k])
        rows_k += [k] * len(chosen)
        rows_u += chosen
    return pa.table({"k": pa.array(rows_k, pa.int32()), "user": pa.array(rows_u, pa.int32())})


def _meta_pass(block: pa.Table, vocab: pa.Array) -> pa.Table:
    """One pass over parsed metadata: the line accounting of the block (rows with `n` set) and the
    usable records of kept items (rows with `item` set), in one table so the file is read once."""
    import pyarrow.compute as pc
    acct = _line_accounting(block)
    t = block.filter(pc.is_null(block["error"]))
    t = t.filter(pc.is_in(t["item"], value_set=vocab))
    items = {c: t[c].cast(pa.string()) for c in ("item", "title", "description", "categories")}
    n_a, n_i = acct.num_rows, t.num_rows
    cols = {c: pa.concat_arrays([pa.nulls(n_a, pa.string()), items[c].combine_chunks()]) for c in items}
    for c, typ in (("file", pa.int32()), ("outcome", pa.string()), ("partial", pa.bool_()), ("n", pa.int64()),
                   ("first_line", pa.int64()), ("last_line", pa.int64())):
        cols[c] = pa.concat_arrays([acct[c].combine_chunks().cast(typ), pa.nulls(n_i, typ)])
    return pa.table(cols)


def _item_table(ray, cfg: Config, inputs, item_vocab: pa.Array, train_counts: dict,
                unit: str) -> tuple[pa.Table, dict, list]:
    import pyarrow.compute as pc
    d = cfg.data
    meta: dict[str, tuple[str, str, str]] = {}
    reports: list = []
    if inputs.meta:
        ds = _read(ray, d.format, inputs.meta, inputs.line_based, "meta")
        parts = ray.get(ds.map_batches(_meta_pass, fn_kwargs={"vocab": item_vocab}, batch_format="pyarrow",
                                       batch_size=None).to_arrow_refs())
        reports = _reports_from(
            [t.filter(pc.is_valid(t["n"])) for t in parts], inputs.meta, "metadata", unit)
        for t in parts:
            t = t.filter(pc.is_valid(t["item"]))
            for it, ti, de, ca in zip(*(t[c].to_pylist() for c in ("item", "title", "description", "categories"))):
                meta.setdefault(it, (ti or "", de or "", ca or ""))
    raw_ids = item_vocab.to_pylist()
    titles, texts, cats = [], [], []
    n_title = n_desc = n_meta = 0
    for rid in raw_ids:
        ti, de, ca = meta.get(rid, ("", "", ""))
        n_meta += rid in meta
        ti = text.clean_text(ti, d.max_title_chars)
        de = text.clean_text(de)
        n_title += bool(ti)
        n_desc += bool(de)
        titles.append(text.prompt_title(ti, rid, d.max_title_chars))
        texts.append(text.item_text(titles[-1], de, d.max_text_chars))
        cats.append(ca)
    counts = np.array([train_counts.get(i + 1, 0) for i in range(len(raw_ids))], dtype=np.int64)
    groups = popularity_groups(counts, d.warm_fraction, d.cold_fraction)
    tbl = pa.table({
        "item": pa.array(np.arange(1, len(raw_ids) + 1, dtype=np.int32)),
        "raw_id": item_vocab,
        "title": pa.array(titles, pa.string()),
        "text": pa.array(texts, pa.string()),
        "categories": pa.array(cats, pa.string()),
        "n_train": pa.array(counts.astype(np.int32)),
        "group": pa.array(groups.tolist(), pa.string()),
    })
    coverage = {"items": len(raw_ids), "items_in_metadata": n_meta, "items_with_title": n_title,
                "items_with_description": n_desc}
    return tbl, coverage, reports


def _check_coverage(cov: dict, n_items: int, meta_files: list[str], max_missing: float) -> None:
    """Refuse to prepare items most of which would be shown to the LLM as "Item <id>" placeholders."""
    missing = n_items - cov["items_with_title"]
    share = missing / max(n_items, 1)
    if share <= max_missing:
        return
    where = ", ".join(Path(f).name for f in meta_files) if meta_files else "no metadata file"
    raise readers.InputError(
        f"{missing:,} of {n_items:,} items ({share:.1%}) have no title in {where} "
        f"({cov['items_in_metadata']:,} found in it at all), above data.max_missing_title_fraction={max_missing:g}: "
        "is it the metadata of these reviews? An LLM shown placeholder titles learns nothing; set "
        "data.max_missing_title_fraction=1 to prepare anyway")


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    c = m.get("counts", {})
    dropped = {k: v for k, v in m.get("dropped_rows", {}).items() if k == "rating_filter"}
    cov = m.get("text_coverage", {})
    n = max(cov.get("items", 0), 1)
    lines = [f"prepared {out_dir}",
             f"  users {c.get('users'):,} (+{c.get('cold_users'):,} cold users, rule {c.get('cold_user_rule')}) | "
             f"items {c.get('items'):,} | interactions {c.get('interactions'):,}",
             f"  {c.get('k_core')}-core before holdout: {c.get('k_core_users'):,} users / {c.get('items'):,} items / "
             f"{c.get('k_core_interactions'):,} interactions ({c.get('k_core_iterations')} iterations)",
             f"  warm items {c.get('warm_items'):,} | cold items {c.get('cold_items'):,}",
             f"  item text from metadata: title {cov.get('items_with_title', 0):,} "
             f"({cov.get('items_with_title', 0) / n:.1%}), description {cov.get('items_with_description', 0):,} "
             f"({cov.get('items_with_description', 0) / n:.1%}) of {cov.get('items', 0):,} items; "
             f"{c.get('items_without_title', 0):,} shown as 'Item <id>'",
             f"  duplicates removed {c.get('duplicates_removed'):,}"
             + (f" | below the rating threshold {dropped['rating_filter']:,}" if dropped else "")
             + f" | {m.get('timings_s', {}).get('total')} s"]
    table = readers.format_reports(m.get("input_lines", []))
    if table:
        lines += ["  every input line, kept or dropped (manifest.json: input_lines):", table]
    return "\n".join(lines)
