"""Plain single-process training and candidate evaluation for CF models (the Ray job wraps these).

Evaluation protocol (the paper's): each user has C candidates, the positive in column 0 and sampled
negatives after it; the model scores all of them from the user's history and we report the 0-based rank
of the positive. Ties are broken against the positive (allmrec.metrics.ranks_from_scores).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

from allmrec.cf.base import CFModel
from allmrec.cf.data import pad_left
from allmrec.metrics import ranks_from_scores, summarize


def train_epoch(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                optimizer: torch.optim.Optimizer) -> float:
    """One pass over `batches`; returns the mean batch loss. `model` may be a CFModel or a
    DistributedDataParallel wrapper of one (the loss is computed through `forward`)."""
    model.train()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = model(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite CF training loss {loss.item()} at batch {n}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item()
        n += 1
    if n == 0:
        raise ValueError("train_epoch got no batches")
    return total / n


@torch.no_grad()
def score_candidates(model: CFModel, histories: Sequence[Sequence[int]], users: Sequence[int] | np.ndarray | None,
                     candidates: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(U, C) float32 scores of candidates[u] given histories[u] (users None: unseen users)."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != len(histories):
        raise ValueError(f"candidates must be (U, C) with U = {len(histories)} histories, got {candidates.shape}")
    if users is not None and len(users) != len(histories):
        raise ValueError(f"{len(histories)} histories but {len(users)} users")
    if candidates.size and (candidates.min() < 1 or candidates.max() > model.n_items):
        raise ValueError(f"candidate ids must be in 1..{model.n_items}")
    was_training = model.training
    model.eval()
    device = model.device
    out = np.empty(candidates.shape, dtype=np.float32)
    try:
        for start in range(0, len(histories), batch_size):
            stop = min(start + batch_size, len(histories))
            seqs = torch.from_numpy(pad_left(histories[start:stop], model.max_len)).to(device)
            u = None if users is None else torch.as_tensor(np.asarray(users[start:stop], dtype=np.int64), device=device)
            x_u = model.user_representation(seqs, u)
            items = torch.from_numpy(candidates[start:stop]).to(device)
            out[start:stop] = model.score(x_u, items).float().cpu().numpy()
    finally:
        model.train(was_training)
    return out


def evaluate_candidates(model: CFModel, histories: Sequence[Sequence[int]], users: Sequence[int] | np.ndarray | None,
                        candidates: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(U,) 0-based rank of column 0 (the positive) among each user's C candidates; ties count against it."""
    return ranks_from_scores(score_candidates(model, histories, users, candidates, batch_size))


def popularity_scores(train_seqs: Sequence[Sequence[int]], n_items: int) -> np.ndarray:
    """(n_items + 1,) training interaction counts (the most-popular baseline); index 0 (padding) is -inf.
    Rank candidates with `ranks_from_scores(popularity_scores(...)[candidates])`."""
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_seqs]) if len(train_seqs) else np.zeros(0, np.int64)
    if flat.size and (flat.min() < 1 or flat.max() > n_items):
        raise ValueError(f"item ids must be in 1..{n_items}")
    counts = np.bincount(flat, minlength=n_items + 1).astype(np.float64)
    counts[0] = -np.inf
    return counts


def fit(model: CFModel, batches: Iterable[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer, epochs: int,
        valid: tuple[Sequence[Sequence[int]], Sequence[int] | None, np.ndarray] | None = None,
        patience: int = 10, eval_every: int = 1, metric: str = "ndcg@10",
        log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train for up to `epochs`; with `valid` = (histories, users, candidates), evaluate every `eval_every`
    epochs, stop after `patience` evaluations without improving `metric`, and restore the best weights.
    Returns one record per epoch (epoch, loss, seconds, and the validation metrics when evaluated)."""
    records: list[dict] = []
    best, best_state, bad = -np.inf, None, 0
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        rec: dict = {"epoch": epoch, "loss": train_epoch(model, batches, optimizer)}
        if valid is not None and epoch % eval_every == 0:
            rec.update(summarize(evaluate_candidates(model, *valid)))
            if rec[metric] > best:
                best, bad = rec[metric], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
        if log is not None:
            log(rec)
        if valid is not None and bad >= patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return records
