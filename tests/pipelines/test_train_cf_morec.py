"""train-cf with cf.model=morec: the encode output is handed to the model, and its absence is a clear error."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from allmrec.artifacts import RunFolder
from allmrec.cf import MoRec, load_cf_model
from allmrec.data.load import Prepared
from pipelines import train_cf as job

pytestmark = pytest.mark.ray


def _fake_encode(cfg, n_items: int, dim: int = 24, fp: str = "enc-1") -> np.ndarray:
    """What `allmrec encode` leaves behind (vectors random instead of SBERT's: this tests the hand-over)."""
    out = RunFolder(cfg).encode
    (out / "text_emb.parquet").mkdir(parents=True, exist_ok=True)
    vecs = np.random.default_rng(0).normal(size=(n_items + 1, dim)).astype(np.float32)
    vecs[0] = 0
    items = np.arange(1, n_items + 1)
    table = pa.table({"item": pa.array(items, pa.int32()), "emb": pa.array(list(vecs[1:]), pa.list_(pa.float32()))})
    pq.write_table(table, out / "text_emb.parquet" / "part-0.parquet")
    (out / "manifest.json").write_text(json.dumps({"fingerprint": fp, "job": "encode"}))
    return vecs


def test_morec_job_needs_encode_then_trains_and_saves_a_self_contained_model(tiny_cfg_factory, monkeypatch):
    cfg = tiny_cfg_factory("cf.model=morec", "cf.epochs=2", "cf.patience=50", "cf.lr=0.01", run="morec")
    with pytest.raises(FileNotFoundError, match="allmrec encode"):
        job.train_cf(cfg)
    n_items = Prepared(RunFolder(cfg).data).n_items
    vecs = _fake_encode(cfg, n_items)

    out = job.train_cf(cfg)
    assert out == RunFolder(cfg).cf_dir("morec")
    m = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in m["history"]] == [1, 2] and "model" in m["test"]
    model = load_cf_model(out)  # the cf/ folder alone: the text vectors travel in model.safetensors
    assert isinstance(model, MoRec) and torch.equal(model.text_embeddings(), torch.from_numpy(vecs))
    assert pq.read_table(out / "item_emb.parquet").num_rows == n_items + 1

    # up to date: not retrained; new text vectors (a new encode fingerprint): retrained
    monkeypatch.setattr(job, "init_ray", lambda cfg: (_ for _ in ()).throw(RuntimeError("retraining")))
    assert job.train_cf(cfg) == out
    _fake_encode(cfg, n_items, fp="enc-2")
    with pytest.raises(RuntimeError, match="retraining"):
        job.train_cf(cfg)
