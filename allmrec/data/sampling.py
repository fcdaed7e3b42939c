"""Seeded per-user randomness that is identical across runs, machines and numbers of workers.

Every random choice about a user (negatives, cold-user holdout, few-shot order) draws from a generator
seeded by (global seed, stable hash of the user's raw id, stream). No generator state is shared between
users, so how rows are split into blocks or workers cannot change any result.
"""
from __future__ import annotations

import hashlib

import numpy as np

# streams: independent purposes drawing from the same (seed, user)
STREAM_VALID = 1
STREAM_TEST = 2
STREAM_HOLDOUT = 3
STREAM_FEWSHOT = 4
STREAM_COLD_TEST = 5
STREAM_NEG100 = 6             # train-cf's 1 + 100 test candidates
STREAM_STAGE2 = 8             # Stage-2 / TALLRec training negatives and order, keyed by the integer user id
# the candidate order in prompts, keyed by the integer user id (or the history). Evaluation has always used
# [seed, user, 9]: changing it changes every reported result and every served ranking.
STREAM_CANDIDATE_ORDER = 9


def stable_hash(raw_id: str) -> int:
    """64-bit hash of a raw id that does not depend on PYTHONHASHSEED or the platform."""
    return int.from_bytes(hashlib.blake2b(raw_id.encode("utf-8"), digest_size=8).digest(), "little")


def user_rng(seed: int, raw_id: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stable_hash(raw_id), stream])


def user_uniform(seed: int, raw_id: str, stream: int) -> float:
    return float(user_rng(seed, raw_id, stream).random())


def sample_negatives(rng: np.random.Generator, n_items: int, exclude: np.ndarray, n: int) -> np.ndarray:
    """`n` distinct item ids from 1..n_items, none in `exclude` (the user's whole history).

    Rejection sampling: cheap when the history is a small part of the catalogue (the usual case); falls
    back to an explicit complement when it is not.
    """
    excl = set(int(x) for x in exclude)
    if n_items <= 4 * len(excl) + 4 * n:
        pool = np.setdiff1d(np.arange(1, n_items + 1), np.fromiter(excl, dtype=np.int64, count=len(excl)))
        if len(pool) < n:
            raise ValueError(f"cannot draw {n} negatives: only {len(pool)} items outside the user's history")
        return rng.choice(pool, size=n, replace=False).astype(np.int32)
    out: list[int] = []
    seen = set(excl)
    while len(out) < n:
        for x in rng.integers(1, n_items + 1, size=2 * (n - len(out))):
            x = int(x)
            if x not in seen:
                seen.add(x)
                out.append(x)
                if len(out) == n:
                    break
    return np.asarray(out, dtype=np.int32)
