"""`allmrec stage1`: collaborative-text alignment (A-LLMRec Stage-1) on Ray Train + DeepSpeed.

Every worker: the frozen CF model (weights shipped through Ray, not a shared disk) under no_grad in
eval(); SBERT tokenized once for every item, its frozen lower layers run once per item when only the
top N are fine-tuned; the aligner + SBERT wrapped by the shared DeepSpeed engine (ZeRO stage from the
config; 0 by default). One example per user (its last training item) or every position ("all items").
A checkpoint per epoch (trainable state only, 2 kept). Then a Ray Data job writes, for every item, the
joint embedding e_i = f_I^enc(E_i) and the text-side q_i = f_T^enc(SBERT_ft(text_i)).
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

from allmrec.config import Config, config_from_dict
from allmrec.data import schema
from allmrec.data.load import Prepared
from allmrec.io import atomic_dir, fingerprint, is_complete, read_manifest
from pipelines.common import init_ray, make_trainer, run_path, training_users
from pipelines.rows import stage1_examples

log = logging.getLogger("allmrec.stage1")
EXPORT = "export.safetensors"


def _bundle(directory: Path) -> dict[str, bytes]:
    """A small artifact folder as bytes, so workers on other nodes get it through Ray."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.suffix in {".json", ".safetensors"}}


def load_cf_bundle(files: dict[str, bytes]):
    """The frozen CF model from its files' bytes (shipped to workers in the train config)."""
    from allmrec.cf import load_cf_model
    with tempfile.TemporaryDirectory(prefix="allmrec-cf-") as d:  # the weights are copied into the model
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        model = load_cf_model(d)
    model.eval()  # frozen: no dropout (the reference code forgets this)
    model.requires_grad_(False)
    return model


def _collect(shard) -> dict[str, np.ndarray]:
    parts = [p for p in shard.iter_batches(batch_size=4096, batch_format="numpy") if len(next(iter(p.values())))]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _by_user(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows sorted by user (stable): a worker's shard in an order that does not depend on Ray Data's
    block scheduling."""
    if not rows:
        return rows
    idx = np.argsort(rows["user"], kind="stable")
    return {k: v[idx] for k, v in rows.items()}


def _item_texts(items: dict) -> list[str]:
    n = int(items["item"].max())
    texts = [""] * (n + 1)  # row i = item id i; row 0 = padding
    for i, t in zip(items["item"], items["text"]):
        texts[int(i)] = str(t)
    return texts


def build_stage1_model(cfg: Config, cf_dim: int, device: str = "cpu"):
    from allmrec.align.sbert import TextEncoder, load_sbert
    from allmrec.align.stage1 import Stage1Model
    te = TextEncoder(load_sbert(cfg.encode.model, device=device), trainable_layers=cfg.stage1.sbert_trainable_layers)
    return Stage1Model.from_config(cfg.stage1, cf_dim, te)


def train_func(config: dict) -> None:
    import ray.train

    from allmrec.cf.data import sample_negatives
    from pipelines import engine as eng

    from pipelines.common import quiet_worker_logs
    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"])
    s1 = cfg.stage1
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    eng.init_distributed(s1.use_gpu)
    device = "cuda" if s1.use_gpu else "cpu"
    cf = load_cf_bundle(config["cf_files"]).to(device)
    with torch.no_grad():
        E = cf.item_embeddings().detach()

    torch.manual_seed(cfg.seed)
    model = build_stage1_model(cfg, cf.hidden, device)
    items = _collect(ray.train.get_dataset_shard("items"))
    model.text_encoder.pretokenize(_item_texts(items), cfg.encode.max_seq_length)
    train = _by_user(_collect(ray.train.get_dataset_shard("train")))  # order independent of Ray Data scheduling
    # frozen lower SBERT layers: computed once for the items this worker will ever encode
    model.text_encoder.precompute_lower(64, items=torch.from_numpy(np.unique(train["pos"])))
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
            idx = order[i:i + s1.batch_size]
            pos = train["pos"][idx]
            neg = sample_negatives(pos[:, None], list(train["hist"][idx]), cf.n_items, rng)[:, 0]
            with torch.no_grad():
                x_u = cf.user_representation(torch.from_numpy(train["seq"][idx]).to(device),
                                             torch.from_numpy(train["user"][idx]).to(device))
            pos_t, neg_t = torch.from_numpy(pos).to(device), torch.from_numpy(neg).to(device)
            losses = engine({"pos_items": pos_t.cpu(), "neg_items": neg_t.cpu(), "x_u": x_u,
                             "E_pos": E[pos_t], "E_neg": E[neg_t]})
            engine.backward(losses["total"])
            engine.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_steps += 1
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch, **{k: v / max(n_steps, 1) for k, v in sums.items()},
               "seconds": round(dt, 2), "users_per_s": round(n_steps * s1.batch_size / max(dt, 1e-9), 2)}
        history.append(rec)
        export = eng.trainable_state(engine, ("aligner.", "text_encoder."))
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=eng.CKPT_TAG, client_state={"epoch": epoch, "history": history},
                                   exclude_frozen_parameters=True)
            if rank == 0:
                (Path(tmp) / EXPORT).write_bytes(st_save({k: v.contiguous() for k, v in export.items()}))
                (Path(tmp) / "history.json").write_text(json.dumps(history))
            ray.train.report(rec, checkpoint=ray.train.Checkpoint.from_directory(tmp))


class JointEmbedder:
    """Ray Data actor: every item's e_i (from the CF table) and q_i (fine-tuned SBERT -> f_T^enc).

    `text_only`: the items are not the CF model's (cross-domain), so e_i is q_i, the paper's rule for items
    the CF model lacks."""

    def __init__(self, cfg_dict: dict, bundle_ref, threads: int, text_only: bool = False):
        import ray

        from allmrec.align.stage1 import joint_embeddings, text_joint_embeddings
        torch.set_num_threads(threads)
        cf_files, export, texts = ray.get(bundle_ref[0])
        cfg = config_from_dict(cfg_dict)
        cf = load_cf_bundle(cf_files)
        self.model = build_stage1_model(cfg, cf.hidden)
        self.model.load_state_dict(st_load(export), strict=False)
        self.model.eval()
        self.model.text_encoder.pretokenize(texts, cfg.encode.max_seq_length)
        self.e = None
        if not text_only:
            with torch.no_grad():
                self.e = joint_embeddings(self.model.aligner, cf.item_embeddings()).numpy()
        self.text_joint = text_joint_embeddings

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        ids = torch.from_numpy(batch["item"].astype(np.int64))
        Q = self.model.text_encoder.encode_items(ids)
        q = self.text_joint(self.model.aligner, Q).numpy().astype(np.float32)
        e = q if self.e is None else self.e[ids.numpy()].astype(np.float32)
        return {"item": batch["item"], "e": list(e), "q": list(q)}


def stage1(cfg: Config, force: bool = False, fail_at_epoch: int | None = None) -> Path:
    data_dir, cf_dir = run_path(cfg, "data"), run_path(cfg, "cf")
    m, mcf = read_manifest(data_dir), read_manifest(cf_dir)
    if m is None or mcf is None:
        raise FileNotFoundError(f"stage1 needs {data_dir} and {cf_dir}: run `allmrec prepare` and `allmrec train-cf`")
    s1 = cfg.stage1
    out_dir = run_path(cfg, "stage1")
    fp = fingerprint({"data": m["fingerprint"], "cf": mcf["fingerprint"], "seed": cfg.seed,
                      "stage1": cfg.to_dict()["stage1"] | {"num_workers": None, "use_gpu": None},
                      "sbert": [cfg.encode.model, cfg.encode.max_seq_length],
                      **({"fewshot": cfg.fewshot} if cfg.fewshot else {})})
    if not force and is_complete(out_dir, fp):
        log.info("stage1: %s is up to date; use --force to retrain", out_dir)
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
    cf_files = _bundle(cf_dir)
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

    with atomic_dir(out_dir) as tmp:
        item_table(cfg, cf_files, export, prep).write_parquet(str(tmp / "joint_emb.parquet"))
        (tmp / EXPORT).write_bytes(export)
        (tmp / "metrics.json").write_text(json.dumps({"history": history, "train_seconds": round(train_s, 1)},
                                                    indent=2))
        cfg.dump(tmp / "config.yaml")
        (tmp / schema.MANIFEST).write_text(json.dumps({
            "fingerprint": fp, "job": "stage1", "epochs_run": len(history), "workers": s1.num_workers,
            "train_seconds": round(train_s, 1), "final": history[-1] if history else None}, indent=2))
        _plot_losses(history, tmp / "loss.png", "Stage-1 losses")
    return out_dir


def item_table(cfg: Config, cf_files: dict[str, bytes], export: bytes, prep: Prepared, text_only: bool = False):
    """Ray Data job (actors load the models once): (item, e, q) for every item of `prep`, with the Stage-1
    model `export` trained in `cfg`'s run on top of the CF model `cf_files`."""
    import ray

    items = prep.items
    texts = [""] * (int(items["item"].max()) + 1)
    for i, t in zip(items["item"], items["text"]):
        texts[int(i)] = t
    ds = ray.data.from_items([{"item": int(i)} for i in range(0, len(texts))])
    return ds.repartition(max(2, len(texts) // 512)).map_batches(
        JointEmbedder, batch_size=64, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
        # the big inputs travel once through the object store (wrapped so Ray does not inline them)
        fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "bundle_ref": [ray.put((cf_files, export, texts))],
                               "threads": cfg.torch_threads or os.cpu_count() or 1, "text_only": text_only},
        num_cpus=1)


def _plot_losses(history: list[dict], path: Path, title: str) -> None:
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
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(out_dir: Path) -> str:
    m = read_manifest(out_dir) or {}
    f = m.get("final") or {}
    return (f"stage1 -> {out_dir}: {m.get('epochs_run')} epochs in {m.get('train_seconds')} s; final loss "
            f"{f.get('total', float('nan')):.4f} (matching {f.get('matching', float('nan')):.4f}, "
            f"rec {f.get('rec', float('nan')):.4f}), {f.get('users_per_s')} users/s")
