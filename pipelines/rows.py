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


def next_title_examples(block: pa.Table, n_items: int, n_negatives: int, seed: int,
                        examples_per_user: int = 1, heldout_target: bool = False) -> dict:
    """Next-title examples from the training part of each sequence, 19 seeded negatives each.

    The first example of a user is the paper's: history -> the last training item. `examples_per_user`
    k > 1 (a departure from the paper, `stage2.examples_per_user`) adds up to k - 1 earlier ones: targets
    drawn without replacement from positions 1 .. len - 2 of the training part, each with the items before
    it as history and its own negatives and candidate order. Every draw is seeded by (seed, user), so the
    first example is the same for every k and the set is the same in every run and epoch. A user with
    fewer earlier positions than k - 1 gives what it has. Rows come out grouped by user, targets in order.

    `heldout_target` (`stage2.heldout_target`, a departure): the part is the training items plus the
    validation item, so the first example is history = the whole training part -> the validation item, a
    target the CF model never trained on; earlier ones may then include the last training item. The test
    item is never a target. The draws are those of the default (the same seeds, one position later)."""
    if examples_per_user < 1:
        raise ValueError(f"examples_per_user must be >= 1, got {examples_per_user}")
    users, hists, cands, targets = [], [], [], []
    for u, s in zip(block["user"].to_pylist(), block["seq"].to_pylist()):
        part = s[:-1] if heldout_target else s[:-2]  # where the examples come from (never the test item)
        if len(part) < 2:
            continue
        rng = np.random.default_rng([seed, int(u), STREAM_STAGE2])
        picks = [len(part) - 1]
        if examples_per_user > 1 and len(part) > 2:
            more = np.random.default_rng([seed, int(u), STREAM_STAGE2, 1])  # k > 1 leaves `rng` as for k = 1
            earlier = more.choice(np.arange(1, len(part) - 1), min(examples_per_user - 1, len(part) - 2),
                                  replace=False)
            picks = sorted(int(t) for t in earlier) + picks
        else:
            more = rng
        for t in picks:
            r = rng if t == len(part) - 1 else more
            neg = sample_negatives(r, n_items, np.asarray(s), n_negatives)  # never any item of the sequence
            c = [part[t], *neg.tolist()]
            r.shuffle(c)
            users.append(u)
            hists.append(np.asarray(part[:t], dtype=np.int64))
            cands.append(c)
            targets.append(part[t])
    return {"user": np.asarray(users, dtype=np.int64), "hist": np.array(hists + [None], dtype=object)[:-1],
            "cands": np.asarray(cands, dtype=np.int64).reshape(len(users), n_negatives + 1),
            "target": np.asarray(targets, dtype=np.int64)}


def epoch_batches(order: np.ndarray, batch_size: int, lengths: np.ndarray | None = None, window: int = 0,
                  rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """One epoch's batches of row indices, from the epoch's seeded permutation `order`.

    window = 0: consecutive slices of `order` (the paper's shuffled batches). window = W > 0 (length
    bucketing, `stage2.bucket_window`): `order` is cut into windows of W batches, each window's rows are
    sorted by `lengths` (the prompt's tokens) and cut into batches, and all batches are shuffled by `rng`:
    each batch holds rows of similar length (less left padding per step), still drawn at random from the
    epoch. The number of batches is ceil(len(order) / batch_size) either way (the same steps on every rank).
    """
    if batch_size < 1 or window < 0:
        raise ValueError(f"batch_size must be >= 1 and window >= 0, got {batch_size} and {window}")
    if window == 0:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if lengths is None or rng is None:
        raise ValueError("length bucketing needs the rows' lengths and a seeded rng")
    span = window * batch_size
    batches = []
    for i in range(0, len(order), span):
        part = order[i:i + span]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]
