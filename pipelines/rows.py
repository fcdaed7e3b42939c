"""The Ray Data row builders of the training jobs (numpy and pyarrow only).

They run in Ray Data task workers, which import this module to unpickle them. Keeping torch out of it
saves each fresh worker its imports: a first read + map_batches took 8.5 s with a builder from
pipelines.stage1, against 2.2 s with one that imports nothing (2-core machine).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from allmrec.data.padding import pad_left
from allmrec.data.sampling import STREAM_STAGE2, sample_negatives


def cf_train_rows(block: pa.Table, max_len: int) -> dict:
    """sequences rows -> SASRec-style (input, target) arrays of the training part seq[:-2]."""
    seqs = block["seq"].to_pylist()
    train = [s[:-2] for s in seqs]
    keep = [i for i, t in enumerate(train) if len(t) >= 2]
    users = block["user"].to_numpy()[keep].astype(np.int64)
    return {"users": users,
            "seq": pad_left([train[i][:-1] for i in keep], max_len),
            "pos": pad_left([train[i][1:] for i in keep], max_len),
            # negatives avoid the whole sequence (valid/test items included)
            "hist": np.array([np.asarray(seqs[i], dtype=np.int64) for i in keep] + [None], dtype=object)[:-1]}


def cf_valid_rows(block: pa.Table) -> dict:
    return {"user": block["user"].to_numpy().astype(np.int64),
            "history": np.array([np.asarray(h, dtype=np.int64) for h in block["history"].to_pylist()] + [None],
                                dtype=object)[:-1],
            "cands": np.array([[t, *n] for t, n in zip(block["target"].to_pylist(),
                                                        block["negatives"].to_pylist())], dtype=np.int64)}


def stage1_examples(block: pa.Table, all_items: bool, max_len: int) -> dict:
    """Training examples from sequences: history -> positive (last training item, or every position)."""
    hist, pos, full, users = [], [], [], []
    for u, s in zip(block["user"].to_pylist(), block["seq"].to_pylist()):
        train = s[:-2]
        targets = range(1, len(train)) if all_items else [len(train) - 1]
        for t in targets:
            if t < 1:
                continue
            hist.append(train[:t])
            pos.append(train[t])
            full.append(np.asarray(s, dtype=np.int64))
            users.append(u)
    return {"user": np.asarray(users, dtype=np.int64), "seq": pad_left(hist, max_len),
            "pos": np.asarray(pos, dtype=np.int64), "hist": np.array(full + [None], dtype=object)[:-1]}


def next_title_examples(block: pa.Table, n_items: int, n_negatives: int, seed: int) -> dict:
    """One example per user from the training part: history -> last training item, 19 seeded negatives."""
    users, hists, cands, targets = [], [], [], []
    for u, s in zip(block["user"].to_pylist(), block["seq"].to_pylist()):
        train = s[:-2]
        if len(train) < 2:
            continue
        rng = np.random.default_rng([seed, int(u), STREAM_STAGE2])
        neg = sample_negatives(rng, n_items, np.asarray(s), n_negatives)
        c = [train[-1], *neg.tolist()]
        rng.shuffle(c)
        users.append(u)
        hists.append(np.asarray(train[:-1], dtype=np.int64))
        cands.append(c)
        targets.append(train[-1])
    return {"user": np.asarray(users, dtype=np.int64), "hist": np.array(hists + [None], dtype=object)[:-1],
            "cands": np.asarray(cands, dtype=np.int64).reshape(len(users), n_negatives + 1),
            "target": np.asarray(targets, dtype=np.int64)}
