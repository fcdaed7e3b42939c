"""train-cf as a Ray Train job: 2 DDP workers, checkpoints, resume after an injected worker failure."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from allmrec.cf import load_cf_model
from pipelines.train_cf import train_cf

pytestmark = pytest.mark.ray


def test_two_workers_train_resume_after_a_failure_and_write_outputs(tiny_cfg_factory):
    # one job for both (every Ray Train job costs seconds of process start-up): 2 DDP workers, and rank 0
    # fails at epoch 2; the restarted group goes on from the epoch-1 checkpoint
    cfg = tiny_cfg_factory("cf.epochs=3", "cf.num_workers=2", "cf.patience=50", "cf.lr=0.01", "cf.max_failures=1")
    out = train_cf(cfg, fail_at_epoch=2)
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    ckpts = [p for p in (out.parent / "ray_results").rglob("checkpoint_*") if p.is_dir()]
    assert ckpts and len(ckpts) <= 2  # per-epoch checkpoints, only the last 2 kept
    model = load_cf_model(out)
    emb = pq.read_table(out / "item_emb.parquet")
    assert emb.num_rows == model.n_items + 1 and len(emb["emb"][0]) == 16
    reps = pq.read_table(out / "user_reps.parquet")
    assert reps.num_rows > 0 and len(reps["x_u"][0]) == 16
    assert {"model", "most_popular"} <= set(m["test"])
    # a finished run is not repeated
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert train_cf(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp
