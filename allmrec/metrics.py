"""Ranking metrics from the 0-based rank of the positive among its candidates (pure numpy).

rank 0 = the positive is ranked first. With one positive per user: Hit@K = [rank < K],
NDCG@K = [rank < K] / log2(rank + 2), MRR = 1 / (rank + 1); each averaged over users.
"""
from __future__ import annotations

import numpy as np


def _ranks(ranks) -> np.ndarray:
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer):
        if not np.all(np.isfinite(r)) or np.any(r != np.round(r)):
            raise ValueError("ranks must be whole numbers")
        r = r.astype(np.int64)
    if r.min() < 0:
        raise ValueError(f"ranks are 0-based and must be >= 0, got {r.min()}")
    return r


def ranks_from_scores(scores) -> np.ndarray:
    """0-based rank of column 0 (the positive) among the columns of `scores` (U, C), higher = better.

    Ties are broken against the positive: a candidate scoring exactly the same as the positive counts
    as ranked above it, so a model that scores everything equally gets the worst rank, not the best.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 1:
        raise ValueError(f"scores must have shape (U, C), got {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return (s[:, 1:] >= s[:, :1]).sum(axis=1).astype(np.int64)


def hit_at_k(ranks, k: int) -> float:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(np.mean(_ranks(ranks) < k))


def ndcg_at_k(ranks, k: int) -> float:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    r = _ranks(ranks)
    return float(np.mean(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)))


def mrr(ranks) -> float:
    return float(np.mean(1.0 / (_ranks(ranks) + 1.0)))


def proportion_se(p: float, n: int) -> float:
    """Binomial standard error of a proportion p over n users (Hit@K): sqrt(p (1 - p) / n)."""
    return float(np.sqrt(p * (1 - p) / n))


def paired_difference(hits_a, hits_b) -> dict[str, float | int]:
    """Hit@K of model a minus model b on the same n cases (0/1 each), with the standard error of that paired
    difference, sd(a - b) / sqrt(n): smaller than the two unpaired errors combined when the models agree on
    many cases, so it is the error to judge "a beats b" on one test set by. wins: a hits where b misses."""
    a, b = np.asarray(hits_a, dtype=np.float64), np.asarray(hits_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired hits must be two 1-D arrays of one non-zero length, got {a.shape} and {b.shape}")
    d = a - b
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return {"diff": float(d.mean()), "se": se, "wins": int((d > 0).sum()), "losses": int((d < 0).sum()),
            "n": int(d.size)}


def summarize(ranks, ks: tuple[int, ...] = (1, 3, 5, 10)) -> dict[str, float | int]:
    """{"hit@1": ..., "ndcg@1": ..., ..., "mrr": ..., "n": number of users}."""
    r = _ranks(ranks)
    out: dict[str, float | int] = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(r, k)
        out[f"ndcg@{k}"] = ndcg_at_k(r, k)
    out["mrr"] = mrr(r)
    out["n"] = int(r.size)
    return out
