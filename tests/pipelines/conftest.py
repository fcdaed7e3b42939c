"""A tiny prepared dataset (synthetic, Markov-structured so models can learn it) shared by pipeline tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allmrec.config import load_config
from bench.fixtures import save_tiny_llama, write_markov_seq_txt  # noqa: F401  (the tests' synthetic inputs)


# train-cf settings shared by tests/pipelines/test_train_cf.py and test_train_cf_agnostic.py (collected after
# it): the same run folder ("run") and fingerprints, so the second finds these CF models trained, side by side
CF_SASREC = ("cf.epochs=3", "cf.num_workers=2", "cf.patience=50", "cf.lr=0.01", "cf.checkpoint_every=1")
CF_GRU4REC = ("cf.epochs=3", "cf.num_workers=1", "cf.patience=50", "cf.max_failures=1", "cf.model=gru4rec",
              "cf.checkpoint_every=1")  # the resume test needs epoch 1's checkpoint


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


@pytest.fixture(scope="session")
def trained_tiny(tiny_cfg_factory, tmp_path_factory):
    """A tiny run with CF, Stage-1 (frozen SBERT: fast) and Stage-2 (tiny Llama, 2 workers ZeRO-3) done.
    Stage-1's rank 0 fails at epoch 2 and its job resumes from the epoch-1 checkpoint (fault tolerance
    tested here: a separate job would cost another worker-group start-up)."""
    from pipelines.stage1 import stage1
    from pipelines.stage2 import stage2
    from pipelines.train_cf import train_cf

    llm = save_tiny_llama(tmp_path_factory.mktemp("llm"))
    cfg = tiny_cfg_factory("cf.epochs=2", "stage1.epochs=2", "stage1.sbert_trainable_layers=0",
                           "stage1.batch_size=16", f"stage2.llm={llm}", "stage2.epochs=1", "stage2.num_workers=2",
                           "stage2.max_users=24", "stage2.batch_size=4", "encode.max_seq_length=32", "cf.max_failures=1",
                           run="trained")
    train_cf(cfg)
    stage1(cfg, fail_at_epoch=2)
    s2 = stage2(cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    return cfg, s2
