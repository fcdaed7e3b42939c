"""`allmrec encode`: SBERT-encode every item text with a Ray Data actor pool -> <run>/encode/text_emb.parquet.

Each actor loads the sentence-transformers model once; `num_gpus=1` per actor on a GPU cluster.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from allmrec.artifacts import RESOLVED_CONFIG, RunFolder
from allmrec.config import Config
from allmrec.data import schema
from allmrec.io import atomic_dir, fingerprint, read_manifest
from pipelines.common import actor_pool, init_ray, up_to_date
from pipelines.fingerprints import model_identity

log = logging.getLogger("allmrec.encode")


class SbertActor:
    def __init__(self, model: str, max_seq_length: int, use_gpu: bool, threads: int):
        import torch

        from allmrec.align.sbert import load_sbert
        torch.set_num_threads(threads)
        self.model = load_sbert(model, device="cuda" if use_gpu else "cpu")
        self.model.max_seq_length = max_seq_length

    def __call__(self, batch: dict) -> dict:
        emb = self.model.encode(list(batch["text"]), batch_size=len(batch["text"]), convert_to_numpy=True,
                                show_progress_bar=False)
        return {"item": batch["item"], "emb": list(emb.astype(np.float32))}


def encode(cfg: Config, force: bool = False) -> Path:
    rf = RunFolder(cfg)
    data_dir = rf.data
    m = rf.require(data_dir, "allmrec prepare")
    out_dir = rf.encode
    e = cfg.encode
    fp = fingerprint({"data": m["fingerprint"], "encode": {"model": e.model, "max_seq_length": e.max_seq_length},
                      "sbert": model_identity(e.model, "sbert")})
    if up_to_date("encode", out_dir, fp, force):
        return out_dir
    ray = init_ray(cfg)
    t0 = time.perf_counter()
    n_actors = max(1, e.num_actors)
    threads = max(1, (os.cpu_count() or 1) // n_actors) if not e.use_gpu else 1
    ds = ray.data.read_parquet(str(data_dir / schema.ITEMS), columns=["item", "text"])
    n_items = ds.count()
    # enough blocks that every actor gets work (one parquet file reads as one block)
    ds = ds.repartition(max(2 * n_actors, min(256, n_items // (4 * e.batch_size) + 1)))
    ds = ds.map_batches(SbertActor, batch_size=e.batch_size, batch_format="numpy",
                        compute=actor_pool(n_actors),
                        fn_constructor_kwargs={"model": e.model, "max_seq_length": e.max_seq_length,
                                               "use_gpu": e.use_gpu, "threads": threads},
                        num_gpus=1 if e.use_gpu else 0, num_cpus=0 if e.use_gpu else threads)
    with atomic_dir(out_dir) as tmp:
        ds.write_parquet(str(tmp / schema.TEXT_EMB))
        n = ray.data.read_parquet(str(tmp / schema.TEXT_EMB)).count()
        dt = time.perf_counter() - t0
        dim = len(ray.data.read_parquet(str(tmp / schema.TEXT_EMB)).take(1)[0]["emb"])
        (tmp / schema.MANIFEST).write_text(json.dumps({
            "fingerprint": fp, "job": "encode", "model": e.model, "items": n, "dim": dim,
            "actors": n_actors, "seconds": round(dt, 2), "items_per_s": round(n / dt, 2)}, indent=2))
        cfg.dump(tmp / RESOLVED_CONFIG)
    return out_dir


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    return (f"encoded {m.get('items'):,} items with {m.get('model')} -> dim {m.get('dim')} "
            f"({m.get('items_per_s')} items/s, {m.get('actors')} actors) in {out_dir}")
