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
from pipelines.common import init_ray, run_path

log = logging.getLogger("allmrec.prepare")


# ---------------------------------------------------------------- reading

def _parse_lines_batch(batch: dict, fmt: str, header: list[str] | None, kind: str) -> dict:
    lines = list(batch["text"])
    if kind == "inter":
        out = readers.parse_interaction_lines(fmt, lines, header=header)
    else:
        out = readers.parse_meta_lines(fmt, lines, header=header)
    return {k: np.asarray(v, dtype=object) if k in ("user", "item", "title", "description", "categories", "error")
            else np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _parse_whole_file(batch: dict, kind: str) -> dict:
    out: dict[str, list] = {}
    for data in batch["bytes"]:
        txt = bytes(data).decode("utf-8")
        part = readers.parse_seq_json(txt) if kind == "inter" else readers.parse_seq_json_items(txt)
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return {k: np.asarray(v, dtype=object) if k in ("user", "item", "title", "description", "categories", "error")
            else np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _read(ray, fmt: str, files: list[str], line_based: bool, kind: str):
    if not files:
        return None
    if line_based:
        header = readers.read_recbole_header(files[0]) if fmt == "recbole" else None
        ds = ray.data.read_text(files)
        return ds.map_batches(_parse_lines_batch, fn_kwargs={"fmt": fmt, "header": header, "kind": kind},
                              batch_format="numpy", batch_size=8192)
    ds = ray.data.read_binary_files(files)
    return ds.map_batches(_parse_whole_file, fn_kwargs={"kind": kind}, batch_format="numpy", batch_size=1)


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
    out_dir = run_path(cfg, "data")
    timer = Timer()
    inputs = readers.resolve_inputs(d.format, d.path, d.category)
    with timer("hash_inputs"):
        digests = [file_digest(p) for p in inputs.interactions + inputs.meta]
    fp = fingerprint({"inputs": digests, "data": cfg.to_dict()["data"], "seed": cfg.seed, "version": 1})
    if not force and is_complete(out_dir, fp):
        log.info("prepare: %s is up to date (same inputs and config); use --force to rebuild", out_dir)
        return out_dir

    ray = init_ray(cfg)
    t_start = time.perf_counter()
    with timer("parse"):
        raw = _read(ray, d.format, inputs.interactions, inputs.line_based, "inter").materialize()
        errors = _sum_counts(raw, _error_counts, key="error")
        n_rows = raw.count()
    kept = raw.map_batches(_valid_rows, fn_kwargs={"threshold": d.rating_threshold}, batch_format="pyarrow")
    n_valid = n_rows - sum(errors.values())

    with timer("sequences"):
        n_blocks = _num_blocks(n_valid)
        users_ds = (kept.repartition(n_blocks, keys=["user"])
                    .map_batches(group_user_sequences, batch_size=None, batch_format="pyarrow")
                    .materialize())
        stats = _sum_counts(users_ds, _counts_of_users)
    n_after_rating = stats["interactions"] + stats["duplicates"]

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
        items_tbl, n_placeholder = _item_table(ray, cfg, inputs, item_vocab, train_counts)

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
                "items_without_title": n_placeholder,
            },
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


def _item_table(ray, cfg: Config, inputs, item_vocab: pa.Array, train_counts: dict) -> tuple[pa.Table, int]:
    d = cfg.data
    meta: dict[str, tuple[str, str, str]] = {}
    if inputs.meta:
        ds = _read(ray, d.format, inputs.meta, inputs.line_based, "meta")
        vocab = item_vocab

        def keep(block: pa.Table) -> pa.Table:
            import pyarrow.compute as pc
            t = block.filter(pc.is_null(block["error"]))
            return t.filter(pc.is_in(t["item"], value_set=vocab)).select(["item", "title", "description",
                                                                          "categories"])
        for t in ray.get(ds.map_batches(keep, batch_format="pyarrow").to_arrow_refs()):
            for it, ti, de, ca in zip(*(t[c].to_pylist() for c in ("item", "title", "description", "categories"))):
                meta.setdefault(it, (ti or "", de or "", ca or ""))
    raw_ids = item_vocab.to_pylist()
    titles, texts, cats = [], [], []
    n_placeholder = 0
    for rid in raw_ids:
        ti, de, ca = meta.get(rid, ("", "", ""))
        ti = text.clean_text(ti, d.max_title_chars)
        if not ti:
            n_placeholder += 1
        titles.append(text.prompt_title(ti, rid, d.max_title_chars))
        texts.append(text.item_text(titles[-1], text.clean_text(de), d.max_text_chars))
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
    return tbl, n_placeholder


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    c = m.get("counts", {})
    dropped = m.get("dropped_rows", {})
    return (f"prepared {out_dir}\n"
            f"  users {c.get('users'):,} (+{c.get('cold_users'):,} cold users, rule {c.get('cold_user_rule')}) | "
            f"items {c.get('items'):,} | interactions {c.get('interactions'):,}\n"
            f"  {c.get('k_core')}-core before holdout: {c.get('k_core_users'):,} users / {c.get('items'):,} items / "
            f"{c.get('k_core_interactions'):,} interactions ({c.get('k_core_iterations')} iterations)\n"
            f"  warm items {c.get('warm_items'):,} | cold items {c.get('cold_items'):,} | "
            f"items without title {c.get('items_without_title'):,}\n"
            f"  dropped rows: {dropped or 'none'} | duplicates removed {c.get('duplicates_removed'):,} | "
            f"{m.get('timings_s', {}).get('total')} s")
