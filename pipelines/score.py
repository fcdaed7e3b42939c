"""`allmrec score`: top-k recommendations for every user of a prepared dataset, with Ray Data.

Retrieval then re-ranking: the CF model scores the whole catalogue (history excluded); with
`score.pool=cf_topn` its top `pool_size` items are re-ranked by A-LLMRec (the LLM's likelihood of each
title after the soft-token prompt), with `score.pool=all` the CF scores over all items are the result.
Users are cut into fixed chunks; each chunk is written atomically as `scores/part-<chunk>.parquet`
(user, rank, item, score), so a killed job resumes where it stopped and never half-writes a file.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allmrec.artifacts import load_recommender, user_reps
from allmrec.config import Config, config_from_dict
from allmrec.data.load import Prepared
from allmrec.io import fingerprint, read_manifest, write_json_atomic
from pipelines.common import init_ray, run_path

log = logging.getLogger("allmrec.score")
CHUNK = 128


def top_pool(cf, hists: list[np.ndarray], users: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CF retrieval: the n best catalogue items per user, never an item of the history."""
    x = torch.from_numpy(user_reps(cf, hists, users))
    scores = x @ cf.item_embeddings().detach().float().T  # (B, n_items + 1)
    scores[:, 0] = -torch.inf
    for b, h in enumerate(hists):
        scores[b, torch.as_tensor(np.asarray(h, dtype=np.int64))] = -torch.inf
    top = torch.topk(scores, n, dim=1)
    return top.indices.numpy(), top.values.numpy()


class ChunkScorer:
    """Ray Data actor: scores whole chunks of users and writes one parquet file per chunk."""

    def __init__(self, cfg_dict: dict, out_dir: str, threads: int):
        torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg_dict)
        self.out = Path(out_dir)
        s = self.cfg.score
        if s.pool == "cf_topn":
            self.rec, self.cf, self.prep = load_recommender(self.cfg, "allmrec")
        else:
            from allmrec.cf import load_cf_model
            self.rec, self.cf = None, load_cf_model(run_path(self.cfg, "cf")).eval()
            self.prep = Prepared(run_path(self.cfg, "data"))
        self.seqs = dict(zip(self.prep.sequences["user"], self.prep.sequences["seq"]))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from allmrec.recommender import Example
        s = self.cfg.score
        rows = []
        for chunk, lo, hi in zip(batch["chunk"], batch["lo"], batch["hi"]):
            t0 = time.perf_counter()
            users = np.arange(lo, hi, dtype=np.int64)
            hists = [np.asarray(self.seqs[int(u)]) for u in users]
            n = max(s.top_k, s.pool_size) if s.pool == "cf_topn" else s.top_k
            items, scores = top_pool(self.cf, hists, users, n)
            if s.pool == "cf_topn":
                reps = user_reps(self.cf, hists, users)
                llm_scores = np.zeros(items.shape, dtype=np.float32)
                bs = s.batch_size
                for i in range(0, len(users), bs):
                    exs = [Example(reps[j], hists[j], items[j].tolist()) for j in range(i, min(i + bs, len(users)))]
                    llm_scores[i:i + len(exs)] = self.rec.rank(exs, length_norm=self.cfg.eval.length_norm)
                order = np.argsort(-llm_scores, axis=1, kind="stable")[:, :s.top_k]
                items = np.take_along_axis(items, order, 1)
                scores = np.take_along_axis(llm_scores, order, 1)
            df = pd.DataFrame({"user": np.repeat(users, s.top_k).astype(np.int32),
                               "rank": np.tile(np.arange(1, s.top_k + 1), len(users)).astype(np.int16),
                               "item": items[:, :s.top_k].reshape(-1).astype(np.int32),
                               "score": scores[:, :s.top_k].reshape(-1).astype(np.float32)})
            final = self.out / f"part-{int(chunk):05d}.parquet"
            tmp = self.out / f".part-{int(chunk):05d}.{uuid.uuid4().hex[:6]}.tmp"
            df.to_parquet(tmp)
            os.replace(tmp, final)  # a chunk file exists only when complete
            rows.append({"chunk": int(chunk), "users": len(users), "seconds": time.perf_counter() - t0})
        return pd.DataFrame(rows)


def score(cfg: Config, force: bool = False) -> Path:
    s = cfg.score
    data_dir = run_path(cfg, "data")
    m = read_manifest(data_dir)
    if m is None or read_manifest(run_path(cfg, "cf")) is None:
        raise FileNotFoundError("score needs prepare and train-cf outputs (and stage1/stage2 for pool=cf_topn)")
    if s.top_k < 1 or (s.pool == "cf_topn" and s.pool_size < s.top_k):
        raise ValueError(f"need 1 <= score.top_k <= score.pool_size, got {s.top_k}, {s.pool_size}")
    out_dir = run_path(cfg, "scores")
    fp = fingerprint({"data": m["fingerprint"], "score": cfg.to_dict()["score"],
                      "cf": read_manifest(run_path(cfg, "cf"))["fingerprint"],
                      "stage2": (read_manifest(run_path(cfg, "stage2")) or {}).get("fingerprint")})
    state = read_manifest(out_dir)
    if force or (state is not None and state.get("fingerprint") != fp):
        import shutil
        shutil.rmtree(out_dir, ignore_errors=True)  # inputs changed: old parts are stale
        state = None
    if state is not None and state.get("complete"):
        log.info("score: %s is up to date; use --force to redo", out_dir)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "manifest.json", {"fingerprint": fp, "job": "score", "complete": False})
    prep = Prepared(data_dir)
    n_users = prep.n_train_users if s.max_users is None else min(s.max_users, prep.n_train_users)
    chunks = [(c, lo, min(lo + CHUNK, n_users)) for c, lo in enumerate(range(0, n_users, CHUNK))]
    todo = [c for c in chunks if not (out_dir / f"part-{c[0]:05d}.parquet").exists()]
    log.info("score: %d of %d chunks to do (%d users each)", len(todo), len(chunks), CHUNK)
    t0 = time.perf_counter()
    if todo:
        ray = init_ray(cfg)
        n_act = max(1, min(s.num_actors, len(todo)))
        ds = ray.data.from_pandas(pd.DataFrame(todo, columns=["chunk", "lo", "hi"])).repartition(len(todo))
        done = ds.map_batches(ChunkScorer, batch_size=1, batch_format="pandas",
                              compute=ray.data.ActorPoolStrategy(size=n_act),
                              fn_constructor_kwargs={"cfg_dict": cfg.to_dict(), "out_dir": str(out_dir),
                                                     "threads": max(1, (os.cpu_count() or 1) // n_act)},
                              num_cpus=1).to_pandas()
        n_done = int(done["users"].sum())
    else:
        n_done = 0
    dt = time.perf_counter() - t0
    write_json_atomic(out_dir / "manifest.json", {
        "fingerprint": fp, "job": "score", "complete": True, "users": n_users, "chunks": len(chunks),
        "users_scored_this_run": n_done, "seconds": round(dt, 1),
        "users_per_s": round(n_done / dt, 2) if n_done else None, "pool": s.pool, "top_k": s.top_k})
    return out_dir


def summary(out_dir: Path) -> str:
    m = json.loads((out_dir / "manifest.json").read_text())
    return (f"scored {m['users']:,} users (top-{m['top_k']}, pool {m['pool']}) -> {out_dir}/part-*.parquet; "
            f"{m['users_scored_this_run']:,} this run in {m['seconds']} s ({m['users_per_s']} users/s)")
