"""train-cf as a Ray Train job: 2 DDP workers, checkpoints, resume after an injected worker failure."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from allmrec.artifacts import RunFolder
from allmrec.cf import load_cf_model
from pipelines.train_cf import train_cf
from tests.pipelines.conftest import CF_GRU4REC, CF_SASREC

pytestmark = pytest.mark.ray


def test_two_workers_train_checkpoint_and_outputs(tiny_cfg_factory):
    cfg = tiny_cfg_factory(*CF_SASREC)
    out = train_cf(cfg)
    assert out == RunFolder(cfg).cf_dir("sasrec")  # cf/<model>/: other CF models live beside it
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
    assert m["history"][-1]["loss"] < m["history"][0]["loss"]
    ckpts = [p for p in RunFolder(cfg).ray_results.glob("train_cf-sasrec-*/checkpoint_*") if p.is_dir()]
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


def test_resumes_after_injected_failure(tiny_cfg_factory):
    cfg = tiny_cfg_factory(*CF_GRU4REC)
    out = train_cf(cfg, fail_at_epoch=2, force=True)  # forced: trained afresh even if another test made it
    assert out == RunFolder(cfg).cf_dir("gru4rec")
    m = json.loads((out / "metrics.json").read_text())
    # epoch 1 came from the checkpoint taken before the failure; epochs 2-3 ran after the restart
    assert [h["epoch"] for h in m["history"]] == [1, 2, 3]
