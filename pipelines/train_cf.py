"""`allmrec train-cf`: pre-train the CF recommender (SASRec by default) with Ray Train.

One `train_func` run by every worker: DDP over gloo (CPU) or NCCL (GPU) via `prepare_model`; training
rows reach workers as Ray Data shards (`get_dataset_shard`); negatives are drawn on the worker from a
generator seeded by (seed, epoch, rank). Validation Hit@1/NDCG@10 every `eval_every` epochs on the
seeded validation candidates, early stopping on NDCG@10, a checkpoint per epoch (2 kept) through
`ray.train.report`, automatic resume after a worker failure (`FailureConfig`).
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn as nn

from allmrec.cf import CF_MODELS, build_cf_model, load_cf_model
from allmrec.cf.data import pad_left, sample_negatives
from allmrec.cf.trainer import evaluate_candidates, popularity_scores
from allmrec.config import Config, config_from_dict
from allmrec.data import schema
from allmrec.data.load import Prepared
from allmrec.data.sampling import STREAM_NEG100, user_rng
from allmrec.data.sampling import sample_negatives as seeded_negs  # per user; cf.data's is per batch
from allmrec.io import atomic_dir, fingerprint, is_complete, read_manifest
from allmrec.metrics import ranks_from_scores, summarize
from pipelines.common import init_ray, make_trainer, run_path, training_users
from pipelines.rows import cf_train_rows, cf_valid_rows

log = logging.getLogger("allmrec.train_cf")


class _Loss(nn.Module):
    """DDP synchronises gradients through `forward`; CF models expose `training_loss` instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.training_loss(batch)


def _collect(shard, key: str) -> dict[str, np.ndarray]:
    """A worker's whole shard, sorted by `key` (one row per user): Ray Data delivers blocks in whatever
    order its tasks finish, and the epoch permutations must index the same rows in every run."""
    parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
    rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    idx = np.argsort(rows[key], kind="stable")
    return {k: v[idx] for k, v in rows.items()}


def train_func(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from pipelines.common import quiet_worker_logs
    quiet_worker_logs()
    cfg = config_from_dict(config["cfg"])
    c = cfg.cf
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    # MoRec: the items' SBERT vectors, shipped once through the object store
    inputs = {"text_emb": ray.get(config["text_emb"][0])} if config.get("text_emb") else {}
    model = build_cf_model(c.model, config["n_items"], config["n_users"], vars(c), **inputs)
    # buffers (MoRec's frozen text vectors) are equal on every rank: no re-broadcast before each forward
    loss_mod = ray.train.torch.prepare_model(_Loss(model), parallel_strategy_kwargs={"broadcast_buffers": False})
    model = loss_mod.module.model if hasattr(loss_mod, "module") else loss_mod.model
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(0.9, 0.98), weight_decay=c.weight_decay)

    start, history, best, best_state, bad = 1, [], -1.0, None, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        best_state = state["best_model"]
        start, history, best, bad = state["epoch"] + 1, json.loads(state["history"]), state["best"], state["bad"]
    valid = _collect(ray.train.get_dataset_shard("valid"), "user")
    # The shard arrives once through Ray Data and is kept in worker memory (O(users x max_len) ints):
    # re-streaming it every epoch cost more than the epoch itself on small sets.
    train = _collect(ray.train.get_dataset_shard("train"), "users")
    n_rows = len(train["users"])
    device = next(model.parameters()).device

    for epoch in range(start, c.epochs + 1):
        if config.get("fail_at_epoch") == epoch and ckpt is None and rank == 0:
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch, 0])  # same on every rank (see stage2)
        order = rng.permutation(n_rows)
        model.train()
        total, n = 0.0, 0
        for i in range(0, n_rows, c.batch_size):
            idx = order[i:i + c.batch_size]
            neg = sample_negatives(train["pos"][idx], list(train["hist"][idx]), config["n_items"], rng)
            batch = {"users": torch.from_numpy(train["users"][idx]), "seq": torch.from_numpy(train["seq"][idx]),
                     "pos": torch.from_numpy(train["pos"][idx]), "neg": torch.from_numpy(neg)}
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = loss_mod(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            n += 1
        rec = {"epoch": epoch, "loss": total / max(n, 1), "train_s": round(time.perf_counter() - t0, 3),
               "examples_per_s": round(n_rows * world / max(time.perf_counter() - t0, 1e-9), 1)}
        if epoch % c.eval_every == 0 or epoch == c.epochs:
            # every rank evaluates the same (full) validation set with the same weights: same decision
            ranks = evaluate_candidates(model, list(valid["history"]), valid["user"], valid["cands"])
            rec.update({f"valid_{k}": v for k, v in summarize(ranks).items()})
            if rec["valid_ndcg@10"] > best:
                best, bad = rec["valid_ndcg@10"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
        history.append(rec)
        stop = bad >= c.patience
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "best_model": best_state,
                            "epoch": epoch, "history": json.dumps(history), "best": best, "bad": bad},
                           Path(tmp) / "state.pt")
                ray.train.report(rec, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(rec)
        if stop:
            break


def train_cf(cfg: Config, force: bool = False, fail_at_epoch: int | None = None) -> Path:
    data_dir = run_path(cfg, "data")
    m = read_manifest(data_dir)
    if m is None:
        raise FileNotFoundError(f"{data_dir} has no prepared data: run `allmrec prepare` first")
    c = cfg.cf
    if c.model not in CF_MODELS:
        raise ValueError(f"unknown CF model {c.model!r}; known: {sorted(CF_MODELS)}")
    out_dir = run_path(cfg, "cf", c.model) if c.model != "sasrec" else run_path(cfg, "cf")
    # models built from the items' text (MoRec) need `allmrec encode`'s output, and retrain when it changes
    needs_text = getattr(CF_MODELS[c.model], "needs_text_embeddings", False)
    enc_dir = run_path(cfg, "encode")
    m_enc = read_manifest(enc_dir) if needs_text else None
    if needs_text and m_enc is None:
        raise FileNotFoundError(f"cf.model={c.model} builds its item embeddings from the items' SBERT vectors, "
                                f"but {enc_dir} holds none: run `allmrec encode` first")
    fp = fingerprint({"data": m["fingerprint"], "cf": cfg.to_dict()["cf"] | {"num_workers": None, "use_gpu": None,
                                                                           "max_failures": None},
                      "seed": cfg.seed, **({"fewshot": cfg.fewshot} if cfg.fewshot else {}),
                      **({"encode": m_enc["fingerprint"]} if needs_text else {})})
    if not force and is_complete(out_dir, fp):
        log.info("train-cf: %s is up to date; use --force to retrain", out_dir)
        return out_dir
    ray = init_ray(cfg)
    prep = Prepared(data_dir)
    inputs = {}
    if needs_text:
        from allmrec.cf.morec import load_text_embeddings
        inputs["text_emb"] = load_text_embeddings(enc_dir, prep.n_items)
    t0 = time.perf_counter()
    seq_ds = ray.data.read_parquet(str(data_dir / schema.SEQUENCES))
    keep = training_users(cfg, prep, None)  # few-shot: learn from the K users only
    if keep is not None:
        seq_ds = seq_ds.filter(lambda r: r["user"] in keep)
    train_ds = seq_ds.map_batches(cf_train_rows, fn_kwargs={"max_len": c.max_len}, batch_format="pyarrow")
    valid_ds = ray.data.read_parquet(str(data_dir / schema.CAND_VALID)).map_batches(
        cf_valid_rows, batch_format="pyarrow")
    trainer = make_trainer(
        cfg, f"train_cf-{c.model}-{fp}", train_func,
        {"cfg": cfg.to_dict(), "n_items": prep.n_items, "n_users": prep.n_train_users, "fail_at_epoch": fail_at_epoch,
         # a list, so that Ray passes the reference on as is (workers ray.get it)
         "text_emb": [ray.put(inputs["text_emb"])] if needs_text else None},
        {"train": train_ds, "valid": valid_ds},
        num_workers=c.num_workers, use_gpu=c.use_gpu, max_failures=c.max_failures, force=force)
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"train-cf finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", weights_only=True)
    model = build_cf_model(c.model, prep.n_items, prep.n_train_users, vars(c), **inputs)
    model.load_state_dict(state["best_model"] or state["model"])
    model.eval()
    history = json.loads(state["history"])

    test = evaluate_test(cfg, prep, model)
    with atomic_dir(out_dir) as tmp:
        model.save(tmp)
        _write_embeddings(prep, model, tmp)
        (tmp / "metrics.json").write_text(json.dumps({"history": history, "test": test,
                                                     "train_seconds": round(train_s, 1)}, indent=2))
        cfg.dump(tmp / "config.yaml")
        (tmp / schema.MANIFEST).write_text(json.dumps({
            "fingerprint": fp, "job": "train-cf", "model": c.model, "epochs_run": len(history),
            "train_seconds": round(train_s, 1), "workers": c.num_workers, "test": test}, indent=2))
    return out_dir


def candidate_matrix(df) -> np.ndarray:
    return np.array([[t, *n] for t, n in zip(df["target"], df["negatives"])], dtype=np.int64)


def evaluate_test(cfg: Config, prep: Prepared, model) -> dict:
    """Test metrics of a CF model and of the most-popular baseline, 1+19 (paper) and 1+100 protocols."""
    test = prep.candidates("test")
    hist = [np.asarray(h) for h in test["history"]]
    cands = candidate_matrix(test)
    out = {"model": summarize(evaluate_candidates(model, hist, test["user"].to_numpy(), cands)),
           "most_popular": summarize(ranks_from_scores(
               popularity_scores([s[:-2] for s in prep.sequences["seq"]], prep.n_items)[cands]))}
    # the common 1 + 100 negatives protocol (for comparison with published SASRec numbers)
    raw = dict(zip(prep.users["user"], prep.users["raw_id"]))
    seqs = dict(zip(prep.sequences["user"], prep.sequences["seq"]))
    c100 = np.array([[t, *seeded_negs(user_rng(cfg.seed, raw[u], STREAM_NEG100), prep.n_items, seqs[u], 100)]
                     for u, t in zip(test["user"], test["target"])], dtype=np.int64) \
        if prep.n_items > 150 else None
    if c100 is not None:
        out["model_1+100"] = summarize(evaluate_candidates(model, hist, test["user"].to_numpy(), c100))
    cold = prep.candidates("cold_users")
    if len(cold):
        # cold users were never trained on: NCF's unseen-user rule applies (users=None)
        out["model_cold_users"] = summarize(evaluate_candidates(model, [np.asarray(h) for h in cold["history"]],
                                                                None, candidate_matrix(cold)))
    groups = prep.items.set_index("item")["group"]
    ranks = evaluate_candidates(model, hist, test["user"].to_numpy(), cands)
    for g in ("warm", "cold"):
        mask = groups.loc[test["target"]].to_numpy() == g
        if mask.any():
            out[f"model_{g}_items"] = summarize(ranks[mask])
    return out


@torch.no_grad()
def _write_embeddings(prep: Prepared, model, out: Path) -> None:
    """Item embedding table and test-time user representations (regular + cold users) as parquet."""
    import pyarrow.parquet as pq
    E = model.item_embeddings().detach().cpu().numpy().astype(np.float32)
    pq.write_table(pa.table({"item": pa.array(np.arange(len(E), dtype=np.int32)),
                             "emb": pa.array(list(E), pa.list_(pa.float32()))}), out / "item_emb.parquet")
    rows_u, rows_x = [], []
    for split, known in (("test", True), ("cold_users", False)):
        df = prep.candidates(split)
        for s in range(0, len(df), 1024):
            part = df.iloc[s:s + 1024]
            seqs = torch.from_numpy(pad_left([np.asarray(h) for h in part["history"]], model.max_len))
            users = torch.tensor(part["user"].to_numpy(), dtype=torch.long) if known else None
            rows_x += list(model.user_representation(seqs, users).float().numpy())
            rows_u += part["user"].tolist()
    pq.write_table(pa.table({"user": pa.array(rows_u, pa.int32()),
                             "x_u": pa.array(rows_x, pa.list_(pa.float32()))}), out / "user_reps.parquet")


def summary(out_dir: Path) -> str:
    m = json.loads((out_dir / "metrics.json").read_text())
    t = m["test"]
    lines = [f"trained {read_manifest(out_dir)['model']} in {m['train_seconds']} s ({len(m['history'])} epochs) -> {out_dir}"]
    for k, v in t.items():
        lines.append(f"  {k:18s} hit@1 {v['hit@1']:.4f}  hit@5 {v['hit@5']:.4f}  ndcg@10 {v['ndcg@10']:.4f}  (n={v['n']})")
    return "\n".join(lines)


def load_trained_cf(cfg: Config):
    return load_cf_model(run_path(cfg, "cf"))
