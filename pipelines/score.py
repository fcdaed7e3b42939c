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

from allmrec.artifacts import RESOLVED_CONFIG, RunFolder, cf_top_n, user_reps
from allmrec.config import Config, config_from_dict
from allmrec.io import fingerprint, read_manifest, write_json_atomic
from pipelines.common import actor_pool, clear_leftovers, init_ray
from pipelines.fingerprints import model_identity, prompt_digest

log = logging.getLogger("allmrec.score")
CHUNK = 128


class ChunkScorer:
    """Ray Data actor: scores whole chunks of users and writes one parquet file per chunk."""

    def __init__(self, cfg_dict: dict, out_dir: str, threads: int):
        torch.set_num_threads(threads)
        self.cfg = config_from_dict(cfg_dict)
        self.out = Path(out_dir)
        s = self.cfg.score
        self.rf = RunFolder(self.cfg)
        if s.pool == "cf_topn":
            self.rec, self.cf, self.prep = self.rf.load_recommender("allmrec")
        else:
            self.rec, self.cf, self.prep = None, self.rf.load_cf(), self.rf.prepared()
        self.seqs = dict(zip(self.prep.sequences["user"], self.prep.sequences["seq"]))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from allmrec.recommender import Example, candidate_order
        s = self.cfg.score
        rows = []
        for chunk, lo, hi in zip(batch["chunk"], batch["lo"], batch["hi"]):
            t0 = time.perf_counter()
            users = np.arange(lo, hi, dtype=np.int64)
            hists = [np.asarray(self.seqs[int(u)]) for u in users]
            n = max(s.top_k, s.pool_size) if s.pool == "cf_topn" else s.top_k
            # x_u and the CF pool one user at a time, as the service computes them (a batched fp32 forward
            # rounds differently, and the pool's order seeds the order the LLM is shown)
            reps = np.concatenate([user_reps(self.cf, [h], [u]) for h, u in zip(hists, users)])
            tops = [cf_top_n(self.cf, [h], [u], n, reps=reps[j:j + 1]) for j, (h, u) in enumerate(zip(hists, users))]
            n = min(t[0].shape[1] for t in tops)  # k may shrink for tiny catalogues
            items = np.concatenate([t[0][:, :n] for t in tops])
            scores = np.concatenate([t[1][:, :n] for t in tops])
            if s.pool == "cf_topn":
                # the LLM sees each pool in candidate_order, as in evaluation and the service: same user, same
                # ranking there and here (docs/serving.md, "Same answer every time")
                items = np.asarray([candidate_order(row.tolist(), self.cfg.seed, user=int(u)) for row, u in zip(items, users)],
                                   dtype=np.int64).reshape(items.shape)
                llm_scores = np.zeros(items.shape, dtype=np.float32)
                bs = s.batch_size
                for i in range(0, len(users), bs):
                    exs = [Example(reps[j], hists[j], items[j].tolist()) for j in range(i, min(i + bs, len(users)))]
                    llm_scores[i:i + len(exs)] = self.rec.rank(exs, length_norm=self.cfg.eval.length_norm)
                order = np.argsort(-llm_scores, axis=1, kind="stable")[:, :s.top_k]
                items = np.take_along_axis(items, order, 1)
                scores = np.take_along_axis(llm_scores, order, 1)
            k = min(s.top_k, items.shape[1])
            df = pd.DataFrame({"user": np.repeat(users, k).astype(np.int32),
                               "rank": np.tile(np.arange(1, k + 1), len(users)).astype(np.int16),
                               "item": items[:, :k].reshape(-1).astype(np.int32),
                               "score": scores[:, :k].reshape(-1).astype(np.float32)})
            final = self.rf.score_part(int(chunk))
            tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:6]}.tmp")
            df.to_parquet(tmp)
            os.replace(tmp, final)  # a chunk file exists only when complete
            rows.append({"chunk": int(chunk), "users": len(users), "seconds": time.perf_counter() - t0})
        return pd.DataFrame(rows)


def plan(cfg: Config) -> tuple[Path, str]:
    """(output folder, fingerprint): the data, the score settings, the CF weights and, for the LLM
    re-ranking (pool=cf_topn), A-LLMRec's Stage-1 and Stage-2, the LLM's identity and the prompt's text."""
    rf = RunFolder(cfg)
    s = cfg.score
    m = rf.require(rf.data, "allmrec prepare")
    inputs: dict = {"data": m["fingerprint"], "eval_length_norm": cfg.eval.length_norm,
                    "score": cfg.to_dict()["score"] | {"num_actors": None}, "cf_weights": rf.cf_identity()}
    if s.pool == "cf_topn":
        inputs |= {"stage1": rf.require(rf.stage1, rf.command("stage1"))["fingerprint"],
                   "stage2": rf.require(rf.stage2("allmrec"), rf.command("stage2"))["fingerprint"],
                   "llm": model_identity(cfg.stage2.llm, "llm"), "llm_dtype": cfg.stage2.llm_dtype,
                   "prompt_settings": cfg.stage2.prompt(), "prompt": prompt_digest(cfg, "joint", True)}
    return rf.scores, fingerprint(inputs)


def score(cfg: Config, force: bool = False) -> Path:
    """Top-k for every user, chunk by chunk (a killed run resumes at the first missing chunk); skipped when
    complete with the same inputs and settings, redone from scratch when they changed or `force`."""
    s = cfg.score
    if s.top_k < 1 or (s.pool == "cf_topn" and s.pool_size < s.top_k):
        raise ValueError(f"need 1 <= score.top_k <= score.pool_size, got {s.top_k}, {s.pool_size}")
    rf = RunFolder(cfg)
    out_dir, fp = plan(cfg)
    clear_leftovers(out_dir)
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
    cfg.dump(out_dir / RESOLVED_CONFIG)
    prep = rf.prepared()
    n_users = prep.n_train_users if s.max_users is None else min(s.max_users, prep.n_train_users)
    chunks = [(c, lo, min(lo + CHUNK, n_users)) for c, lo in enumerate(range(0, n_users, CHUNK))]
    todo = [c for c in chunks if not rf.score_part(c[0]).exists()]
    log.info("score: %d of %d chunks to do (%d users each)", len(todo), len(chunks), CHUNK)
    t0 = time.perf_counter()
    if todo:
        ray = init_ray(cfg)
        n_act = max(1, min(s.num_actors, len(todo)))
        ds = ray.data.from_pandas(pd.DataFrame(todo, columns=["chunk", "lo", "hi"])).repartition(len(todo))
        done = ds.map_batches(ChunkScorer, batch_size=1, batch_format="pandas",
                              compute=actor_pool(n_act),
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
