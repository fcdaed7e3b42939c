"""Training examples for CF models: left padding, SASRec-style shifted sequences, seeded negatives.

A training batch is a dict of LongTensors:
  "users" (B,)    user ids (0..n_users-1; only non-sequential models such as NCF use them)
  "seq"   (B, L)  input items s[:-1], last L of them, left-padded with 0
  "pos"   (B, L)  targets s[1:] aligned with "seq" (pos[t] is the item after seq[t]); 0 where padded
  "neg"   (B, L)  one sampled negative per position: never 0, never an item of the user's history
                  (sampled at padded positions too; the loss masks them by pos != 0)
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from allmrec.data.padding import pad_left  # numpy only; CF code also imports it from here


def make_train_arrays(train_seqs: Sequence[Sequence[int]], users: Sequence[int] | np.ndarray,
                      max_len: int) -> dict[str, np.ndarray]:
    """One example per user with >= 2 training items: seq = s[:-1], pos = s[1:] (last max_len of each).

    Returns {"users": (N,), "seq": (N, max_len), "pos": (N, max_len)}; users with fewer than two items
    give no (input, target) pair and are left out.
    """
    users = np.asarray(users, dtype=np.int64)
    if len(users) != len(train_seqs):
        raise ValueError(f"{len(train_seqs)} sequences but {len(users)} users")
    keep = np.fromiter((len(s) >= 2 for s in train_seqs), dtype=bool, count=len(train_seqs))
    kept = [train_seqs[i] for i in np.flatnonzero(keep)]
    return {
        "users": users[keep],
        "seq": pad_left([s[:-1] for s in kept], max_len),
        "pos": pad_left([s[1:] for s in kept], max_len),
    }


def _history_keys(histories: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """Sorted unique keys row * (n_items + 1) + item for every (row, history item) pair."""
    arrays = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    lens = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if lens.sum() else np.zeros(0, dtype=np.int64)
    rows = np.repeat(np.arange(len(arrays), dtype=np.int64), lens)
    inside = (flat >= 1) & (flat <= n_items)
    keys = np.unique(rows[inside] * (n_items + 1) + flat[inside])
    per_row = np.bincount(keys // (n_items + 1), minlength=len(arrays))
    full = np.flatnonzero(per_row >= n_items)
    if full.size:
        raise ValueError(f"row {int(full[0])} has interacted with all {n_items} items: no negative exists")
    return keys


def _in_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(keys.shape, dtype=bool)
    idx = np.searchsorted(sorted_keys, keys).clip(max=sorted_keys.size - 1)
    return sorted_keys[idx] == keys


def sample_negatives(pos: np.ndarray, histories: Sequence[Sequence[int]], n_items: int,
                     rng: np.random.Generator, max_rounds: int = 32) -> np.ndarray:
    """An array shaped like `pos` (N, ...) of items in 1..n_items, none in histories[row].

    Uniform over the items the row's user has not interacted with. Vectorised rejection sampling: draw
    everything at once, redraw only the collisions; after `max_rounds` the few left (users who have
    seen almost the whole catalogue) are drawn from their explicit complement.
    """
    pos = np.asarray(pos)
    if pos.ndim < 1 or len(histories) != pos.shape[0]:
        raise ValueError(f"pos has {pos.shape[0] if pos.ndim else 0} rows but {len(histories)} histories given")
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    keys = _history_keys(histories, n_items)
    rows = np.broadcast_to(np.arange(pos.shape[0], dtype=np.int64).reshape((-1,) + (1,) * (pos.ndim - 1)),
                           pos.shape)
    neg = rng.integers(1, n_items + 1, size=pos.shape, dtype=np.int64)
    bad = _in_sorted(rows * (n_items + 1) + neg, keys)
    for _ in range(max_rounds):
        if not bad.any():
            return neg
        redraw = rng.integers(1, n_items + 1, size=int(bad.sum()), dtype=np.int64)
        neg[bad] = redraw
        bad[bad] = _in_sorted(rows[bad] * (n_items + 1) + redraw, keys)
    for flat_i in np.flatnonzero(bad.reshape(-1)):
        r = int(rows.reshape(-1)[flat_i])
        allowed = np.setdiff1d(np.arange(1, n_items + 1), np.asarray(histories[r], dtype=np.int64))
        neg.reshape(-1)[flat_i] = rng.choice(allowed)
    return neg


class TrainBatches:
    """Seeded, re-iterable training batches (see the module docstring for the batch format).

    Every `iter()` is one epoch: a fresh shuffle and fresh negatives drawn from
    default_rng([seed, epoch]), so epoch e is the same on every run and every worker. With
    world_size > 1 each rank takes every world_size-th example of the shared shuffle (the tail that
    does not divide evenly is dropped) so all ranks run the same number of batches, as DDP needs.
    `histories` (default: the training sequences) are what negatives must avoid; pass the full
    sequences to also keep validation/test items out.
    """

    def __init__(self, train_seqs: Sequence[Sequence[int]], users: Sequence[int] | np.ndarray, max_len: int,
                 n_items: int, batch_size: int, seed: int = 0,
                 histories: Sequence[Sequence[int]] | None = None, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        histories = train_seqs if histories is None else histories
        if len(histories) != len(train_seqs):
            raise ValueError(f"{len(train_seqs)} sequences but {len(histories)} histories")
        self.arrays = make_train_arrays(train_seqs, users, max_len)
        keep = [i for i, s in enumerate(train_seqs) if len(s) >= 2]
        self.histories = [np.unique(np.asarray(histories[i], dtype=np.int64)) for i in keep]
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.shuffle, self.rank, self.world_size = shuffle, rank, world_size
        self.epoch = 0
        if len(self) == 0:
            raise ValueError("no training examples: every user has fewer than 2 training items")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def n_examples(self) -> int:
        n = len(self.arrays["users"])
        return (n // self.world_size) if self.world_size > 1 else n

    def __len__(self) -> int:
        return -(-self.n_examples // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        n = len(self.arrays["users"])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.world_size > 1:
            order = order[: n - n % self.world_size][self.rank::self.world_size]
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            pos = self.arrays["pos"][idx]
            neg = sample_negatives(pos, [self.histories[i] for i in idx], self.n_items, rng)
            yield {"users": torch.from_numpy(self.arrays["users"][idx]),
                   "seq": torch.from_numpy(self.arrays["seq"][idx]),
                   "pos": torch.from_numpy(pos),
                   "neg": torch.from_numpy(neg)}
