"""`allmrec train-cf`: pre-train the CF recommender (SASRec by default) with Ray Train.

One `train_func` run by every worker: DDP over gloo (CPU) or NCCL (GPU) via `prepare_model`; training
rows reach workers as Ray Data shards (`get_dataset_shard`); negatives are drawn on the worker from a
generator seeded by (seed, epoch, rank). Validation Hit@1/NDCG@10 every `eval_every` epochs on the
seeded validation candidates, early stopping on NDCG@10, a checkpoint every `cf.checkpoint_every` epochs (2 kept) through
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

from allmrec.artifacts import RESOLVED_CONFIG, RunFolder
from allmrec.cf import CF_MODELS, build_cf_model
from allmrec.cf.data import pad_left, sample_negatives
from allmrec.cf.trainer import evaluate_candidates, popularity_scores
from allmrec.config import Config, config_from_dict
from allmrec.data import schema
from allmrec.data.load import Prepared
from allmrec.data.sampling import STREAM_NEG100, user_rng
from allmrec.data.sampling import sample_negatives as seeded_negs  # per user; cf.data's is per batch
from allmrec.io import atomic_dir, fingerprint, read_manifest
from pipelines.tracking import Tracker
from allmrec.metrics import ranks_from_scores, summarize
from pipelines.common import init_ray, make_trainer, training_users, up_to_date
from pipelines.rows import cf_train_rows, cf_valid_rows
from pipelines.workers import collect_sorted

log = logging.getLogger("allmrec.train_cf")


class _Loss(nn.Module):
    """DDP synchronises gradients through `forward`; CF models expose `training_loss` instead."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.training_loss(batch)


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
    tracker = Tracker(config.get("tracking"), "train-cf", config["cfg"], rank)  # MLflow: rank 0 only
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
    # sorted by user: Ray Data delivers blocks in whatever order its tasks finish, and the epoch
    # permutations must index the same rows in every run
    valid = collect_sorted(ray.train.get_dataset_shard("valid"), "user")
    # The shard arrives once through Ray Data and is kept in worker memory (O(users x max_len) ints):
    # re-streaming it every epoch cost more than the epoch itself on small sets.
    train = collect_sorted(ray.train.get_dataset_shard("train"), "users")
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
        # the epoch's wall time, and when it ended: a resumed run's summary tells its epochs from earlier ones
        rec.update(epoch_s=round(time.perf_counter() - t0, 3), finished_at=time.time())
        history.append(rec)
        stop = bad >= c.patience
        if rank == 0:
            tracker.epoch(rec, epoch, c.epochs)
        # Report (and checkpoint) every `checkpoint_every` epochs, at early stopping and at the last epoch, the
        # same epochs on every rank: Ray Train v2 queues one result per worker and its controller takes it at
        # its 2-s poll, so a report per 0.6-s epoch made every epoch last 2 s (docs/benchmarks.md, "train_cf")
        if epoch % c.checkpoint_every == 0 or stop or epoch == c.epochs:
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
    tracker.end()


def train_cf(cfg: Config, force: bool = False, fail_at_epoch: int | None = None) -> Path:
    """Train `cfg.cf.model` into cf/<model>/ (other CF models of the run folder are left alone)."""
    rf = RunFolder(cfg)
    data_dir = rf.data
    m = rf.require(data_dir, "allmrec prepare")
    c = cfg.cf
    if c.model not in CF_MODELS:
        raise ValueError(f"unknown CF model {c.model!r}; known: {sorted(CF_MODELS)}")
    out_dir = rf.cf_dir()
    # models built from the items' text (MoRec) need `allmrec encode`'s output, and retrain when it changes
    needs_text = getattr(CF_MODELS[c.model], "needs_text_embeddings", False)
    enc_dir = rf.encode
    m_enc = read_manifest(enc_dir) if needs_text else None
    if needs_text and m_enc is None:
        raise FileNotFoundError(f"cf.model={c.model} builds its item embeddings from the items' SBERT vectors, "
                                f"but {enc_dir} holds none: run `allmrec encode` first")
    how = {"num_workers": None, "use_gpu": None, "max_failures": None}  # where and how it ran, not what it learned
    cf_settings = {k: v for k, v in cfg.to_dict()["cf"].items() if k != "checkpoint_every"} | how
    fp = fingerprint({"data": m["fingerprint"], "cf": cf_settings,
                      "seed": cfg.seed, **({"fewshot": cfg.fewshot} if cfg.fewshot else {}),
                      **({"encode": m_enc["fingerprint"]} if needs_text else {})})
    if up_to_date("train-cf", out_dir, fp, force):
        return out_dir
    found = rf.cf_found()
    if not force and found is not None and found != out_dir and (read_manifest(found) or {}).get("fingerprint") == fp:
        log.info("train-cf: %s (an older run folder's layout) is up to date; use --force to retrain", found)
        return found
    ray = init_ray(cfg)
    prep = Prepared(data_dir)
    inputs = {}
    if needs_text:
        from allmrec.cf.morec import load_text_embeddings
        inputs["text_emb"] = load_text_embeddings(enc_dir, prep.n_items)
    t0, t0_wall = time.perf_counter(), time.time()
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
                                                     "train_seconds": round(train_s, 1),
                                                     **run_and_attempt(history, t0_wall, train_s)}, indent=2))
        cfg.dump(tmp / RESOLVED_CONFIG)
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


def run_and_attempt(history: list[dict], started_at: float, train_s: float) -> dict:
    """The whole run against this attempt (this command): a run resumed from an earlier attempt's
    checkpoint has epochs in `history` that finished before `started_at`. Whole-run time is the sum of
    the epochs' wall times (start-ups and the gap between attempts are not training)."""
    mine = [h["epoch"] for h in history if h.get("finished_at", started_at) >= started_at]
    return {"run": {"epochs": len(history), "epoch_seconds": round(sum(h.get("epoch_s", 0.0) for h in history), 1)},
            "attempt": {"first_epoch": mine[0] if mine else None, "last_epoch": mine[-1] if mine else None,
                        "epochs": len(mine), "seconds": round(train_s, 1)}}


def summary(out_dir: Path) -> str:
    m = json.loads((out_dir / "metrics.json").read_text())
    t = m["test"]
    model, run, att = read_manifest(out_dir)["model"], m.get("run"), m.get("attempt")
    if run and att and att["epochs"] < run["epochs"]:  # resumed: the whole run, then this attempt
        done = (f"epochs {att['first_epoch']}-{att['last_epoch']}" if att["epochs"] > 1 else
                f"epoch {att['first_epoch']}" if att["epochs"] else "no epoch (its training had finished)")
        lines = [f"trained {model}: {run['epochs']} epochs, {run['epoch_seconds']:,} s of epochs over the whole run; "
                 f"this attempt trained {done} in {att['seconds']:,} s -> {out_dir}"]
    else:
        lines = [f"trained {model} in {m['train_seconds']} s ({len(m['history'])} epochs) -> {out_dir}"]
    for k, v in t.items():
        lines.append(f"  {k:18s} hit@1 {v['hit@1']:.4f}  hit@5 {v['hit@5']:.4f}  ndcg@10 {v['ndcg@10']:.4f}  (n={v['n']})")
    return "\n".join(lines)
