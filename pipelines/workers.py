"""What the training jobs' Ray Train workers share: reading a dataset shard into arrays in an order that
does not depend on Ray Data's scheduling, item titles from a shard, and the loss-curve plot of a job."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def collect(shard) -> dict[str, np.ndarray]:
    """A worker's whole dataset shard as arrays (empty dict for an empty shard), in arrival order."""
    parts = [p for p in shard.iter_batches(batch_size=4096, batch_format="numpy") if len(next(iter(p.values())))]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def sort_rows(rows: dict[str, np.ndarray], key: str = "user") -> dict[str, np.ndarray]:
    """Rows sorted by `key` (stable): a shard in an order that does not depend on Ray Data's block
    scheduling, so that seeded epoch permutations index the same rows in every run."""
    if not rows:
        return rows
    idx = np.argsort(rows[key], kind="stable")
    return {k: v[idx] for k, v in rows.items()}


def collect_sorted(shard, key: str = "user") -> dict[str, np.ndarray]:
    """`collect` then `sort_rows`."""
    return sort_rows(collect(shard), key)


def item_titles_from(items: dict[str, np.ndarray]) -> list[str]:
    """Titles indexed by item id (row 0 = padding) from a collected items shard (item, title)."""
    titles = [""] * (int(items["item"].max()) + 1)
    for i, t in zip(items["item"], items["title"]):
        titles[int(i)] = str(t)
    return titles


def item_texts_from(items: dict[str, np.ndarray]) -> list[str]:
    """Item texts indexed by item id (row 0 = padding) from a collected items shard (item, text)."""
    texts = [""] * (int(items["item"].max()) + 1)
    for i, t in zip(items["item"], items["text"]):
        texts[int(i)] = str(t)
    return texts


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    """A job's loss curve: per-epoch means of its loss terms, and rank 0's per-step losses when recorded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("total", "matching", "item_recon", "text_recon", "rec", "loss") if history and k in history[0]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [(h["epoch"] - 1 + (i + 1) / len(h["step_losses"]), v)
             for h in history for i, v in enumerate(h.get("step_losses") or [])]
    if steps:  # per-step losses (rank 0's batches): raw and a moving mean over 20 steps
        x, y = np.array(steps).T
        ax.plot(x, y, lw=0.6, alpha=0.35, color="tab:gray", label="step (rank 0)")
        w = min(20, len(y))
        ax.plot(x[w - 1:], np.convolve(y, np.ones(w) / w, mode="valid"), color="tab:red", label=f"mean of {w} steps")
    for k in keys:
        ax.plot([h["epoch"] for h in history], [h[k] for h in history], marker="o", label=f"{k} (epoch mean)")
    ax.set_xlabel("epoch")
    # a log scale when every plotted value is positive: Stage-1's small terms (item/text reconstruction,
    # often 1e-3 of the total) are otherwise flattened at 0 beside the larger ones
    plotted = [h[k] for h in history for k in keys] + [v for _, v in steps]
    log = bool(plotted) and all(np.isfinite(v) and v > 0 for v in plotted)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("loss (log scale)" if log else "loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
