"""Left padding of item-id sequences (numpy only: Ray Data row builders use it without importing torch)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_left(seqs: Sequence[Sequence[int]], max_len: int) -> np.ndarray:
    """(N, max_len) int64: the last max_len items of each sequence, left-padded with 0."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    tails = [np.asarray(s, dtype=np.int64)[-max_len:] for s in seqs]
    out = np.zeros((len(tails), max_len), dtype=np.int64)
    if not tails:
        return out
    lens = np.fromiter((len(t) for t in tails), dtype=np.int64, count=len(tails))
    flat = np.concatenate(tails) if lens.sum() else np.zeros(0, dtype=np.int64)
    if flat.size and flat.min() < 1:
        raise ValueError("sequences must hold item ids >= 1 (0 is padding)")
    rows = np.repeat(np.arange(len(tails)), lens)
    starts = np.cumsum(lens) - lens
    cols = max_len - lens[rows] + (np.arange(flat.size) - starts[rows])
    out[rows, cols] = flat
    return out
