"""A tiny prepared dataset (synthetic, Markov-structured so models can learn it) shared by pipeline tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allmrec.config import load_config


def write_markov_seq_txt(folder: Path, n_users: int = 120, n_items: int = 60, seed: int = 0) -> Path:
    """user_sequence.txt + item texts: each item is mostly followed by one of two successors."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, n_items, size=(n_items, 2))
    lines = []
    for u in range(n_users):
        x = int(rng.integers(n_items))
        seq = [x]
        while len(seq) < int(rng.integers(6, 12)):
            x = int(succ[x, rng.integers(2)]) if rng.random() < 0.85 else int(rng.integers(n_items))
            if x not in seq:
                seq.append(x)
        lines.append(f"u{u:04d} " + " ".join(f"i{i:03d}" for i in seq))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user_sequence.txt").write_text("\n".join(lines) + "\n")
    words = ["red", "blue", "lamp", "glove", "bottle", "rope", "tent", "ball", "shoe", "cap"]
    (folder / "item_generative_indexing_phase_0.txt").write_text(
        "".join(f"i{i:03d} {words[i % 10]} {words[(i // 10) % 10]} model {i}\n" for i in range(n_items)))
    return folder


@pytest.fixture(scope="session")
def tiny_cfg_factory(ray_session, tmp_path_factory):
    """Returns make(*overrides) -> Config whose run folder already holds prepared data."""
    from pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("tiny")
    data = write_markov_seq_txt(root / "raw")
    base = [f"data.path={data}", "data.format=seq_txt", "data.k_core=2", "data.fewshot_k=[16]",
            "cf.hidden=16", "cf.max_len=12", "cf.batch_size=32"]
    prepared = {}

    def make(*overrides: str, run: str = "run"):
        cfg = load_config(None, [*base, f"run_dir={root / run}", *overrides])
        if run not in prepared:
            prepare(cfg)
            prepared[run] = True
        return cfg

    return make
