"""`allmrec stage1`: collaborative-text alignment (A-LLMRec Stage-1) on Ray Train + DeepSpeed.

Every worker: the frozen CF model (weights shipped through Ray, not a shared disk) under no_grad in
eval(); SBERT tokenized once for every item, its frozen lower layers run once per item when only the
top N are fine-tuned; the aligner + SBERT wrapped by the shared DeepSpeed engine (ZeRO stage from the
config; 0 by default). One example per user (its last training item) or every position ("all items").
A checkpoint per epoch (trainable state only, 2 kept). Then, for every item, the joint embedding
e_i = f_I^enc(E_i) and the text-side q_i = f_T^enc(SBERT_ft(text_i)): computed by rank 0 after the last
epoch (it cached the frozen SBERT layers for every item, so the export costs the top layers only), or, under
ZeRO-3 or with `stage1.table_on_worker=false`, by a Ray Data job after training (a second full SBERT pass).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from allmrec.artifacts import JOINT_EMB, RESOLVED_CONFIG, STAGE1_EXPORT, RunFolder, cf_from_files, files_sha256
from allmrec.config import Config, config_from_dict
from allmrec.data import schema
from allmrec.data.load import Prepared
from allmrec.io import atomic_dir, fingerprint, read_manifest
from pipelines.common import init_ray, make_trainer, training_users, up_to_date
from pipelines.fingerprints import model_identity
from pipelines.joint import build_stage1_model, item_arrays, item_table, write_item_table
from pipelines.rows import stage1_examples
from pipelines.tracking import Tracker
from pipelines.workers import collect, collect_sorted, item_texts_from, plot_losses

log = logging.getLogger("allmrec.stage1")
EXPORT = STAGE1_EXPORT  # the checkpoint file name of the trained state (as in the run folder)
ITEM_TABLE = "item_table.safetensors"  # e and q of every item, in the last epoch's checkpoint


def table_on_worker(cfg: Config) -> bool:
    """Whether rank 0 computes the item table: it needs the whole model on one rank (not ZeRO-3)."""
    return cfg.stage1.table_on_worker and cfg.stage1.zero_stage < 3


def stage1_batch(cf, E: torch.Tensor, train: dict[str, np.ndarray], idx: np.ndarray, rng: np.random.Generator,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One Stage-1 batch from the frozen CF model: rows `idx` of the training examples, a seeded negative
    per row, x_u of each history and the CF item embeddings E of positives and negatives."""
    from allmrec.cf.data import sample_negatives
    pos = train["pos"][idx]
    neg = sample_negatives(pos[:, None], list(train["hist"][idx]), cf.n_items, rng)[:, 0]
    with torch.no_grad():
        x_u = cf.user_representation(torch.from_numpy(train["seq"][idx]).to(device),
                                     torch.from_numpy(train["user"][idx]).to(device))
    pos_t, neg_t = torch.from_numpy(pos).to(device), torch.from_numpy(neg).to(device)
    return {"pos_items": pos_t.cpu(), "neg_items": neg_t.cpu(), "x_u": x_u, "E_pos": E[pos_t], "E_neg": E[neg_t]}


def train_func(config: dict) -> None:
    import ray.train

    from pipelines import engine as eng

    from pipelines.common import quiet_worker_logs
    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"])
    s1 = cfg.stage1
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    tracker = Tracker(config.get("tracking"), "stage1", config["cfg"], rank)  # MLflow: rank 0 only
    eng.init_distributed(s1.use_gpu)
    device = "cuda" if s1.use_gpu else "cpu"
    cf = cf_from_files(config["cf_files"]).to(device)
    with torch.no_grad():
        E = cf.item_embeddings().detach()

    torch.manual_seed(cfg.seed)
    model = build_stage1_model(cfg, cf.hidden, device)
    items = collect(ray.train.get_dataset_shard("items"))
    model.text_encoder.pretokenize(item_texts_from(items), cfg.encode.max_seq_length)
    train = collect_sorted(ray.train.get_dataset_shard("train"))  # order independent of Ray Data scheduling
    # frozen lower SBERT layers: computed once for the items this worker will ever encode (all of them on
    # rank 0 when it writes the item table at the end, else its training positives)
    writes_table = rank == 0 and table_on_worker(cfg)
    model.text_encoder.precompute_lower(64, items=None if writes_table else torch.from_numpy(np.unique(train["pos"])))
    conf = eng.deepspeed_config(s1.deepspeed_config, micro_batch=s1.batch_size, zero_stage=s1.zero_stage,
                                bf16=s1.use_gpu and cfg.stage2.bf16)
    engine = eng.build_engine(model, s1.lr, conf)
    state = eng.restore(engine) or {}
    start, history = state.get("epoch", 0) + 1, state.get("history", [])

    n_rows = len(train["pos"])
    for epoch in range(start, s1.epochs + 1):
        if config.get("fail_at_epoch") == epoch and not state and rank == 0:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch, 0])  # the same on every rank: see pipelines/stage2.py
        order = rng.permutation(n_rows)
        sums: dict[str, float] = {}
        n_steps = 0
        engine.train()
        model.text_encoder.train()
        for i in range(0, n_rows - s1.batch_size + 1 if n_rows >= s1.batch_size else 1, s1.batch_size):
            losses = engine(stage1_batch(cf, E, train, order[i:i + s1.batch_size], rng, device))
            engine.backward(losses["total"])
            engine.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_steps += 1
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch, **{k: v / max(n_steps, 1) for k, v in sums.items()},
               "seconds": round(dt, 2), "users_per_s": round(n_steps * s1.batch_size / max(dt, 1e-9), 2)}
        history.append(rec)
        if rank == 0:
            tracker.epoch(rec, epoch, s1.epochs)
        export = eng.trainable_state(engine, ("aligner.", "text_encoder."))
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=eng.CKPT_TAG, client_state={"epoch": epoch, "history": history},
                                   exclude_frozen_parameters=True)
            if rank == 0:
                (Path(tmp) / EXPORT).write_bytes(st_save({k: v.contiguous() for k, v in export.items()}))
                (Path(tmp) / "history.json").write_text(json.dumps(history))
            if writes_table and epoch == s1.epochs:
                e, q = item_arrays(model, E)
                (Path(tmp) / ITEM_TABLE).write_bytes(st_save({"e": torch.from_numpy(e), "q": torch.from_numpy(q)}))
            ray.train.report(rec, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    tracker.end()


def stage1(cfg: Config, force: bool = False, fail_at_epoch: int | None = None) -> Path:
    """Train Stage-1 on the configured CF model (`cf.model`); its manifest records the CF weights read."""
    rf = RunFolder(cfg)
    data_dir = rf.data
    m = rf.require(data_dir, "allmrec prepare")
    mcf = rf.cf_manifest()  # MissingArtifact naming `allmrec train-cf ... cf.model=<m>`
    cf_files = rf.cf_files()
    cf_weights = {"model": cfg.cf.model, "sha256": files_sha256(cf_files)}
    s1 = cfg.stage1
    out_dir = rf.stage1
    fp = fingerprint({"data": m["fingerprint"], "cf": mcf["fingerprint"], "cf_weights": cf_weights, "seed": cfg.seed,
                      "stage1": {k: v for k, v in cfg.to_dict()["stage1"].items() if k != "table_on_worker"}
                      | {"num_workers": None, "use_gpu": None},  # where it runs, not what it computes
                      "sbert": [model_identity(cfg.encode.model, "sbert"), cfg.encode.max_seq_length],
                      **({"fewshot": cfg.fewshot} if cfg.fewshot else {})})
    if up_to_date("stage1", out_dir, fp, force):
        return out_dir
    ray = init_ray(cfg)
    t0 = time.perf_counter()
    prep = Prepared(data_dir)
    seq_ds = ray.data.read_parquet(str(data_dir / schema.SEQUENCES))
    keep = training_users(cfg, prep, s1.max_users)
    if keep is not None:
        seq_ds = seq_ds.filter(lambda r: r["user"] in keep)
    train_ds = seq_ds.map_batches(stage1_examples, fn_kwargs={"all_items": s1.all_items, "max_len": cfg.cf.max_len},
                                  batch_format="pyarrow")
    items_ds = ray.data.read_parquet(str(data_dir / schema.ITEMS), columns=["item", "text"])
    trainer = make_trainer(
        cfg, f"stage1-{fp}", train_func, {"cfg": cfg.to_dict(), "cf_files": cf_files, "fail_at_epoch": fail_at_epoch},
        {"train": train_ds, "items": items_ds},
        num_workers=s1.num_workers, use_gpu=s1.use_gpu, max_failures=cfg.cf.max_failures, force=force)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"stage1 finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        export = (Path(d) / EXPORT).read_bytes()
        history = json.loads((Path(d) / "history.json").read_text())
        table = st_load((Path(d) / ITEM_TABLE).read_bytes()) if (Path(d) / ITEM_TABLE).exists() else None

    with atomic_dir(out_dir) as tmp:
        t1 = time.perf_counter()
        if table is not None:
            write_item_table(table["e"].numpy(), table["q"].numpy(), tmp / JOINT_EMB)
        else:  # ZeRO-3 or table_on_worker=false: a Ray Data job, a second SBERT pass over every item
            item_table(cfg, cf_files, export, prep).write_parquet(str(tmp / JOINT_EMB))
        table_s = time.perf_counter() - t1
        (tmp / EXPORT).write_bytes(export)
        (tmp / "metrics.json").write_text(json.dumps({"history": history, "train_seconds": round(train_s, 1),
                                                     "table_seconds": round(table_s, 1)}, indent=2))
        cfg.dump(tmp / RESOLVED_CONFIG)
        (tmp / schema.MANIFEST).write_text(json.dumps({
            "fingerprint": fp, "job": "stage1", "cf_weights": cf_weights, "epochs_run": len(history), "workers": s1.num_workers,
            "train_seconds": round(train_s, 1), "final": history[-1] if history else None}, indent=2))
        plot_losses(history, tmp / "loss.png", "Stage-1 losses")
    return out_dir


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    f = m.get("final") or {}
    return (f"stage1 -> {out_dir}: {m.get('epochs_run')} epochs in {m.get('train_seconds')} s; final loss "
            f"{f.get('total', float('nan')):.4f} (matching {f.get('matching', float('nan')):.4f}, "
            f"rec {f.get('rec', float('nan')):.4f}), {f.get('users_per_s')} users/s")
