"""Block-level transforms of the preparation pipeline, as plain pyarrow/numpy functions.

Each function takes one block (a pyarrow Table) and returns one, so `pipelines/prepare.py` can run them
as Ray Data `map_batches` steps and tests can call them directly. Nothing here gathers a dataset.

Row shapes:
  interactions: user:str, item:str, rating:float, ts:float
  user rows:    user:str, items:list<str>  (chronological, deduplicated), n_dup:int64
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from allmrec.data.sampling import (STREAM_COLD_TEST, STREAM_HOLDOUT, STREAM_TEST, STREAM_VALID,
                                   sample_negatives, user_rng, user_uniform)

USER_ROWS = pa.schema([("user", pa.string()), ("items", pa.list_(pa.string())), ("n_dup", pa.int64())])


def group_user_sequences(block: pa.Table) -> pa.Table:
    """Deduplicate (user, item, ts) and build each user's chronological sequence.

    The block must hold *all* interactions of its users (the caller hash-partitions by user first).
    Ties in time are broken by item id so the order never depends on how rows arrived.
    """
    if block.num_rows == 0:
        return USER_ROWS.empty_table()
    t = block.select(["user", "item", "ts"])
    n_before = t.num_rows
    t = t.group_by(["user", "item", "ts"], use_threads=False).aggregate([])
    t = t.sort_by([("user", "ascending"), ("ts", "ascending"), ("item", "ascending")])
    users = t["user"].combine_chunks()
    items = t["item"].combine_chunks()
    u_np = users.to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, u_np[1:] != u_np[:-1]]) if len(u_np) else np.array([], dtype=np.int64)
    offsets = np.r_[starts, len(u_np)].astype(np.int32)
    seqs = pa.ListArray.from_arrays(pa.array(offsets), items)
    # duplicates removed per user: rows before minus rows after, attributed by user
    before = pc.value_counts(block["user"]).flatten()
    before_map = dict(zip(before[0].to_pylist(), before[1].to_pylist()))
    lens = np.diff(offsets)
    uniq = users.take(pa.array(starts)).to_pylist()
    n_dup = np.array([before_map[u] - n for u, n in zip(uniq, lens)], dtype=np.int64)
    assert n_dup.sum() == n_before - t.num_rows
    return pa.table({"user": pa.array(uniq, pa.string()), "items": seqs, "n_dup": n_dup}, schema=USER_ROWS)


def item_counts(block: pa.Table, column: str = "items", skip_last: int = 0) -> pa.Table:
    """Partial per-item interaction counts of a block of user rows (to be summed by the caller).

    `skip_last` drops the last n items of each sequence (n=2 counts training interactions only).
    """
    seqs = block[column].combine_chunks()
    flat = seqs.flatten()
    if skip_last:
        lens = pc.list_value_length(seqs).to_numpy(zero_copy_only=False).astype(np.int64)
        pos = np.arange(len(flat)) - np.repeat(np.r_[0, np.cumsum(lens)[:-1]], lens)
        flat = flat.filter(pa.array(pos < np.repeat(lens - skip_last, lens)))
    vc = pc.value_counts(flat).flatten() if len(flat) else None
    if vc is None:
        return pa.table({"item": pa.array([], flat.type), "count": pa.array([], pa.int64())})
    return pa.table({"item": vc[0], "count": vc[1]})


def drop_items(block: pa.Table, bad: pa.Array, min_len: int) -> pa.Table:
    """Remove the `bad` items from every sequence, then drop users left with fewer than `min_len`."""
    seqs = block["items"].combine_chunks()
    flat = seqs.flatten()
    keep = pc.invert(pc.is_in(flat, value_set=bad)).to_numpy(zero_copy_only=False)
    offsets = seqs.offsets.to_numpy()
    offsets = offsets - offsets[0]
    cs = np.r_[0, np.cumsum(keep)].astype(np.int32)
    new = pa.ListArray.from_arrays(pa.array(cs[offsets]), flat.filter(pa.array(keep)))
    lens = np.diff(cs[offsets])
    out = block.set_column(block.schema.get_field_index("items"), "items", new)
    return out.filter(pa.array(lens >= min_len))


def user_lengths(block: pa.Table) -> np.ndarray:
    return pc.list_value_length(block["items"]).to_numpy(zero_copy_only=False)


def to_int_ids(block: pa.Table, item_vocab: pa.Array, user_vocab: pa.Array) -> pa.Table:
    """Map raw string ids to contiguous ints: items 1..n (0 = padding), users 0..n-1 (sorted vocabularies)."""
    seqs = block["items"].combine_chunks()
    flat = pc.index_in(seqs.flatten(), value_set=item_vocab)
    if flat.null_count:
        raise ValueError("an item id is missing from the item vocabulary")
    flat = pc.add(flat.cast(pa.int32()), pa.scalar(1, pa.int32()))
    offsets = seqs.offsets.to_numpy()
    seq_int = pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)), flat)
    uid = pc.index_in(block["user"], value_set=user_vocab)
    if uid.null_count:
        raise ValueError("a user id is missing from the user vocabulary")
    return pa.table({"user": uid.cast(pa.int32()), "raw_user": block["user"], "seq": seq_int})


def build_user_outputs(block: pa.Table, *, n_items: int, n_negatives: int, seed: int,
                       cold: bool) -> pa.Table:
    """Per-user evaluation rows with seeded negatives.

    Regular users: valid target seq[-2] (history seq[:-2]), test target seq[-1] (history seq[:-1]).
    Cold users (`cold=True`): the first 3 interactions, history = 2, target = 3rd.
    Negatives never contain an item of the user's whole sequence.
    """
    users = block["user"].to_pylist()
    raws = block["raw_user"].to_pylist()
    seqs = block["seq"].to_pylist()
    cols: dict[str, list] = {"user": [], "raw_user": [], "seq": [], "valid_target": [], "valid_negatives": [],
                             "test_target": [], "test_negatives": []}
    for u, raw, s in zip(users, raws, seqs):
        arr = np.asarray(s, dtype=np.int64)
        if cold:
            s = s[:3]
            neg_t = sample_negatives(user_rng(seed, raw, STREAM_COLD_TEST), n_items, arr, n_negatives)
            vt, vneg = -1, []
        else:
            neg_t = sample_negatives(user_rng(seed, raw, STREAM_TEST), n_items, arr, n_negatives)
            vneg = sample_negatives(user_rng(seed, raw, STREAM_VALID), n_items, arr, n_negatives).tolist()
            vt = s[-2]
        cols["user"].append(u)
        cols["raw_user"].append(raw)
        cols["seq"].append(s)
        cols["valid_target"].append(vt)
        cols["valid_negatives"].append(vneg)
        cols["test_target"].append(s[-1])
        cols["test_negatives"].append(neg_t.tolist())
    return pa.table({
        "user": pa.array(cols["user"], pa.int32()),
        "raw_user": pa.array(cols["raw_user"], pa.string()),
        "seq": pa.array(cols["seq"], pa.list_(pa.int32())),
        "valid_target": pa.array(cols["valid_target"], pa.int32()),
        "valid_negatives": pa.array(cols["valid_negatives"], pa.list_(pa.int32())),
        "test_target": pa.array(cols["test_target"], pa.int32()),
        "test_negatives": pa.array(cols["test_negatives"], pa.list_(pa.int32())),
    })


def holdout_mask(raw_users: list[str], seed: int, fraction: float) -> np.ndarray:
    """Seeded, per-user choice of held-out cold users (independent of block layout)."""
    return np.array([user_uniform(seed, r, STREAM_HOLDOUT) < fraction for r in raw_users], dtype=bool)


def popularity_groups(counts: np.ndarray, warm_fraction: float, cold_fraction: float) -> np.ndarray:
    """'warm' for the top `warm_fraction` of items by training interactions, 'cold' for the bottom
    `cold_fraction`, 'mid' between. Ties are broken by item id (stable sort) so groups are deterministic.
    `counts[i]` is the count of item i+1."""
    n = len(counts)
    order = np.argsort(-counts, kind="stable")  # most interacted first
    groups = np.full(n, "mid", dtype=object)
    n_warm = int(round(warm_fraction * n))
    n_cold = int(round(cold_fraction * n))
    groups[order[:n_warm]] = "warm"
    if n_cold:
        groups[order[n - n_cold:]] = "cold"
    return groups
