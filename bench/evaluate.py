"""Benchmark: recommending with the LLM: candidate ranking (KV cache) vs greedy generation vs ranking
without the cache, and offline scoring with 1 vs 2 Ray Data actors.

    python -m bench.evaluate            # 24 test users (3 batches of 8); no-cache ranking on 2 users
    python -m bench.evaluate --quick    # 8 test users; no-cache ranking on 1 user
    python -m bench.evaluate --job      # `allmrec evaluate` (rank, bf16) against the in-process loop, same rows

Ranking / generation: amazon-scientific test users (/tmp/bench_sci, seeded subset), their 20 candidates
(target + 19 seeded negatives, in the evaluation's seeded order), the packaged SmolLM2-135M-Instruct in
fp32 on the CPU, the LLM-Only prompt (no soft tokens: no trained projector needed; the prompt text and
its cost are the same as A-LLMRec's minus 31 soft-token slots), titles cut to 16 tokens, batches of 8,
2 torch threads; each mode in its own process (its own peak RSS), one untimed warm-up on one user.
- rank: `LLMRecommender.rank`: prompt once, its KV cache copied to the 20 candidates, one batched forward
  over the candidates' title tokens (20 log-likelihood scores per user);
- generate: `LLMRecommender.generate` (greedy, KV cache, stops at eos or newline) with at most 64 new
  tokens: a bounded cap, the reference generates up to 512 (and mostly runs to it, PAPER.md);
- rank without cache (baseline for the cache): for each user, 20 rows "prompt + candidate title", one full
  forward each (batched per user), scores taken from those logits; checked against `rank`'s scores.
Offline scoring: `pipelines.score.score` (CF top-20 pool re-ranked by the LLM, top-10 written) on a copy of
a trained ML-100K run (/tmp/r_ml: data, cf, stage1 embeddings, stage2 projector) with 1 and 2 actors;
`pipelines.score.CHUNK` set so the users make 4 chunks (2 actors have chunks to share). Ray is started before the
clock; the timed `score()` call includes the actors' start (model loading) and the scoring.
Job against in-process (`--job`): `pipelines.evaluate.evaluate` (rank mode, LLM-Only, 1 actor, bf16) on a
throw-away run folder linking /tmp/bench_sci's data and CF model, and `LLMRecommender.rank` in one process
(bf16) on the same rows (`eval_rows`: the seeded test users, then the seeded cold users); the job's users/s
counts its whole variant time (actor start, model load, Ray Data), `inner_users_per_s` only the actor's
time in `rank`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._stages_common import (REPO, SCI_RUN, child_main, ensure_scientific, linked_sci_run, ratio, run_child,
                                  sci_config, wait_for_load)
from bench.common import machine, table, write_results

ML_RUN = Path(os.environ.get("BENCH_ML_RUN", "/tmp/r_ml"))
REFERENCE_GEN_USERS_PER_S = 0.03  # the reference's generation on this machine class (PAPER.md), context only
MAX_NEW_TOKENS = 64
SCORE_CHUNKS = 4  # users are cut into this many chunks (pipelines.score.CHUNK users each)


# ----------------------------------------------------------------------------- child side

def test_examples(cfg, prep, n_users: int):
    """(examples, target index in each candidate list) of the rows `allmrec evaluate` scores with
    eval.max_users=n_users (n seeded test users, then the seeded cold users), in evaluation order."""
    from allmrec.config import config_from_dict
    from allmrec.recommender import Example, candidate_order
    from pipelines.evaluate import eval_rows
    c = config_from_dict(cfg.to_dict())
    c.eval.max_users = n_users
    test = eval_rows(c, prep)
    exs, gold = [], []
    for u, h, t, negs in zip(test["user"], test["history"], test["target"], test["negatives"]):
        c = candidate_order([int(t), *map(int, negs)], cfg.seed, user=u)
        exs.append(Example(None, np.asarray(h), c, int(t)))
        gold.append(c.index(int(t)))
    return exs, np.asarray(gold)


def rank_without_cache(rec, exs, length_norm: bool = True) -> np.ndarray:
    """(B, C) scores: every candidate scored by its own full forward over prompt + title (no KV cache)."""
    import torch

    from allmrec.llm.prompt import lm_forward
    b = rec.batch(exs, with_target=False)
    emb, mask = rec.embeds(b), b["attention_mask"].bool()
    table_ = rec.llm.get_input_embeddings()
    out = np.zeros((len(exs), max(len(e.candidates) for e in exs)), dtype=np.float32)
    with torch.no_grad():
        for u, ex in enumerate(exs):
            prompt = emb[u, mask[u]]  # this user's prompt without padding, (T_u, H)
            cands = [rec.target_ids(i) for i in ex.candidates]
            L = max(len(c) for c in cands)
            rows, masks = [], []
            for c in cands:  # left-pad each "prompt + title" row so every title ends at the right edge
                x = torch.cat([prompt, table_(torch.tensor(c))])
                pad = L - len(c)
                rows.append(torch.cat([x.new_zeros(pad, x.shape[1]), x]))
                masks.append(torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(x), dtype=torch.long)]))
            logits, _ = lm_forward(rec.llm, torch.stack(rows), torch.stack(masks), logits_to_keep=L + 1)
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, c in enumerate(cands):
                n = len(c)  # the n title tokens are predicted at the n positions before the last one
                s = logp[r, L + 1 - (n + 1): L].gather(-1, torch.tensor(c)[:, None]).sum()
                out[u, r] = float(s / n if length_norm else s)
    return out


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["mode"] == "score":
        return run_score(spec)
    if spec["mode"] == "eval_ray":
        return run_eval_ray(spec)
    import torch

    from allmrec.artifacts import item_titles
    from allmrec.data.load import Prepared
    from allmrec.llm.loading import load_llm
    from allmrec.recommender import LLMRecommender

    torch.set_num_threads(spec["threads"])
    cfg = sci_config()
    prep = Prepared(SCI_RUN / "data")
    exs, gold = test_examples(cfg, prep, spec["users"])
    llm, tok = load_llm(cfg.stage2.llm, dtype=getattr(torch, spec.get("dtype", "float32")))
    rec = LLMRecommender(llm, tok, item_titles(prep), cfg.data.domain, projector=None, item_vectors=None,
                         use_user_token=False, history_len=cfg.stage2.history_len,
                         max_title_tokens=cfg.stage2.max_title_tokens)
    mode, bs = spec["mode"], spec["batch"]
    prompt_lens = [len(rec.batch([e], with_target=False)["input_ids"][0]) for e in exs]
    out: dict[str, Any] = {"mode": mode, "prompt_tokens_mean": round(float(np.mean(prompt_lens)), 1),
                           "dtype": spec.get("dtype", "float32")}

    def work(chunk):
        if mode == "rank":
            return rec.rank(chunk)
        if mode == "rank_nocache":
            return rank_without_cache(rec, chunk)
        return rec.generate(chunk, max_new_tokens=spec["max_new_tokens"])

    if mode == "rank_nocache":  # same scores as the cached ranking? (checked on one user, untimed)
        out["max_abs_diff_vs_rank"] = float(np.abs(rank_without_cache(rec, exs[:1]) - rec.rank(exs[:1])).max())
    t0 = time.perf_counter()
    work(exs[:1])  # warm-up
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    times, cpu, results, n = [], [], [], 0
    for i in range(0, len(exs), bs):
        chunk = exs[i:i + bs]
        t0, c0 = time.perf_counter(), time.process_time()
        r = work(chunk)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        results.extend(r)
        n += len(chunk)
        if sum(times) > spec["time_cap_s"]:
            break
    loop = float(sum(times))
    out.update({"users": n, "users_planned": len(exs), "capped": n < len(exs), "loop_s": round(loop, 2),
                "users_per_s": round(n / loop, 4), "cpu_s": round(sum(cpu), 2),
                "users_per_cpu_s": round(n / sum(cpu), 4), "threads": torch.get_num_threads()})
    g = gold[:n]
    if mode == "generate":
        n_tok = [len(tok(t, add_special_tokens=False).input_ids) for t, _ in results]
        out.update({"max_new_tokens": spec["max_new_tokens"], "generated_tokens_mean": round(float(np.mean(n_tok)), 1),
                    "generated_at_cap": int(sum(k >= spec["max_new_tokens"] - 1 for k in n_tok)),
                    "hit@1": round(float(np.mean([m == t for (_, m), t in zip(results, g)])), 4),
                    "named_a_candidate": round(float(np.mean([m is not None for _, m in results])), 4),
                    "sample_outputs": [t for t, _ in results[:3]]})
    else:
        scores = np.stack(results)
        out["hit@1"] = round(float(np.mean(scores.argmax(1) == g)), 4)
    return out


def run_eval_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """`allmrec evaluate` (Ray Data actor pool, rank mode, LLM-Only) on a throw-away run folder linking
    /tmp/bench_sci's data and CF model: the same rows as the in-process loop (`test_examples`)."""
    from pipelines.common import init_ray
    from pipelines.evaluate import evaluate
    with linked_sci_run("bench-eval-ray-") as run:
        cfg = sci_config(f"run_dir={run}", "eval.variants=[llm_only]", "eval.mode=rank",
                         f"eval.max_users={spec['users']}", f"eval.num_actors={spec['actors']}",
                         f"eval.batch_size={spec['batch']}", f"stage2.llm_dtype={spec.get('dtype', 'auto')}")
        t0 = time.perf_counter()
        init_ray(cfg)
        ray_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_dir = evaluate(cfg, force=True)
        wall = time.perf_counter() - t0
        import pandas as pd
        res = pd.read_parquet(out_dir / "results.parquet")
        meta = json.loads((out_dir / "report.json").read_text())["meta"]
        n, variant_s = len(res), meta["seconds"]["llm_only"]
        inner = float(res["rank_s"].sum())  # the actors' own time in LLMRecommender.rank
        return {"mode": "eval_ray", "actors": spec["actors"], "users": n, "variant_s": variant_s,
                "users_per_s": round(n / variant_s, 4), "inner_users_per_s": round(n / inner, 4),
                "evaluate_call_s": round(wall, 1), "ray_start_s": round(ray_s, 1),
                "hit@1": round(float((res["rank"] == 0).mean()), 4), "dtype": spec.get("dtype", "auto")}


def run_score(spec: dict[str, Any]) -> dict[str, Any]:
    """pipelines.score.score on a private copy of the trained ML-100K run (its own scores/ folder)."""
    from allmrec.config import load_config
    from pipelines import score as score_mod
    from pipelines.common import init_ray
    run = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        for part in ("data", "cf", "stage1", "stage2"):
            shutil.copytree(ML_RUN / part, run / part, ignore=shutil.ignore_patterns("export.safetensors"))
        cfg = load_config(REPO / "configs" / "ml100k-smollm2.yaml",
                          [f"run_dir={run}", f"score.max_users={spec['users']}", f"score.num_actors={spec['actors']}",
                           "ray.progress=false"])
        score_mod.CHUNK = spec["chunk"]  # several chunks for a few users, so 2 actors have work to share
        t0 = time.perf_counter()
        init_ray(cfg)
        ray_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_dir = score_mod.score(cfg, force=True)
        wall = time.perf_counter() - t0
        m = json.loads((out_dir / "manifest.json").read_text())
        parts = sorted(out_dir.glob("part-*.parquet"))
        import pandas as pd
        rows = sum(len(pd.read_parquet(p)) for p in parts)
        return {"mode": "score", "actors": spec["actors"], "users": m["users"], "chunks": m["chunks"],
                "rows": rows, "score_s": round(wall, 2), "rows_per_s": round(rows / wall, 2),
                "users_per_s": round(m["users"] / wall, 3), "manifest_users_per_s": m.get("users_per_s"),
                "ray_start_s": round(ray_s, 1), "pool": m["pool"], "top_k": m["top_k"],
                "max_title_tokens": cfg.stage2.max_title_tokens}
    finally:
        shutil.rmtree(run, ignore_errors=True)


# ----------------------------------------------------------------------------- driver

LABELS = {
    "rank": "rank: prompt once + KV cache shared by the 20 candidates",
    "generate": f"generate: greedy, <= {MAX_NEW_TOKENS} new tokens, KV cache",
    "rank_nocache": "rank without KV cache: one full forward per candidate",
    "rank_bf16": "rank, LLM in bf16, in one process (the reference of the job row)",
    "eval_ray": "`allmrec evaluate` rank mode (Ray Data, 1 actor x 2 threads), LLM in bf16",
    "score_1": "offline scoring (Ray Data), 1 actor x 2 threads",
    "score_2": "offline scoring (Ray Data), 2 actors x 1 thread",
}


def _ml_run_ready() -> bool:
    return all((ML_RUN / p / "manifest.json").is_file() for p in ("data", "cf", "stage1", "stage2")) \
        and (ML_RUN / "stage2" / "projector.safetensors").is_file()


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, run_config):
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 users, no-cache ranking on 1 user, scoring 8 users")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--nocache-users", type=int, default=None)
    ap.add_argument("--score-users", type=int, default=None)
    ap.add_argument("--no-score", action="store_true")
    ap.add_argument("--job", action="store_true", help="only the evaluate job against the in-process ranking "
                                                       "loop, bf16, the same rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-cap", type=float, default=180.0, help="stop a timed loop after this many seconds")
    ap.add_argument("--max-load", type=float, default=4.0)
    ap.add_argument("--max-wait", type=float, default=600.0)
    args = ap.parse_args(argv)
    users = args.users or (8 if args.quick else 24)
    nocache = args.nocache_users or (1 if args.quick else 2)
    score_users = args.score_users or (8 if args.quick else 16)

    prep_info = ensure_scientific(train_cf=False)
    budget = {"left": args.max_wait}
    res: dict[str, Any] = {"benchmark": "evaluate", "quick": args.quick, "machine": machine(), "prepared": prep_info,
                           "settings": {"users": users, "nocache_users": nocache, "batch": 8, "threads": args.threads,
                                        "max_new_tokens": MAX_NEW_TOKENS, "variant": "llm_only",
                                        "max_title_tokens": sci_config().stage2.max_title_tokens},
                           "reference_context": {"generation_users_per_s": REFERENCE_GEN_USERS_PER_S,
                                                 "reference_max_length": 512}, "runs": {}}
    base = {"batch": 8, "threads": args.threads, "time_cap_s": args.time_cap, "max_new_tokens": MAX_NEW_TOKENS}
    plan = [("rank", {"mode": "rank", "users": users}), ("generate", {"mode": "generate", "users": users}),
            ("rank_nocache", {"mode": "rank_nocache", "users": nocache}),
            ("rank_bf16", {"mode": "rank", "users": users, "dtype": "bfloat16"}),
            ("eval_ray", {"mode": "eval_ray", "users": users, "actors": 1, "dtype": "bfloat16"})]
    if args.job:
        plan = plan[3:]
        res["score_skipped"] = "--job"
    elif args.no_score:
        res["score_skipped"] = "--no-score"
    elif not _ml_run_ready():
        res["score_skipped"] = f"{ML_RUN} lacks a complete data/cf/stage1/stage2 run"
    else:
        chunk = -(-score_users // SCORE_CHUNKS)
        plan += [(f"score_{a}", {"mode": "score", "actors": a, "users": score_users, "chunk": chunk}) for a in (1, 2)]
    for name, spec in plan:
        gate = wait_for_load(args.max_load, budget)
        print(f"[evaluate] {name} (load {gate['load_at_start']})", flush=True)
        try:
            r = run_child("bench.evaluate", {**base, **spec}, timeout=1800,
                          include_ray=spec["mode"] in ("score", "eval_ray"))
        except RuntimeError as e:
            if spec["mode"] not in ("score", "eval_ray"):
                raise
            # a shared machine can run out of memory (Ray's memory monitor kills the actor): record it
            res.setdefault("failed", {})[name] = str(e)[-1500:]
            print(f"  failed: {str(e)[:300]}", flush=True)
            continue
        r.update(gate)
        res["runs"][name] = r
        print(f"  {r.get('users_per_s')} users/s, peak RSS {r['peak_rss_gib']} GiB", flush=True)
    if "score_skipped" in res:
        print(f"  offline scoring skipped: {res['score_skipped']}")

    runs = res["runs"]
    nc = runs.get("rank_nocache", {})
    rows = []
    for name, r in runs.items():
        if name.startswith("score"):
            continue
        r["x_rank_without_cache"] = ratio(r["users_per_s"], nc.get("users_per_s"))
        r["cpu_x_rank_without_cache"] = ratio(r.get("users_per_cpu_s"), nc.get("users_per_cpu_s"))
        rows.append({"mode": LABELS[name], "users": r["users"], "users/s": r["users_per_s"],
                     "x no-cache rank": r["x_rank_without_cache"], "users/CPU-s": r.get("users_per_cpu_s"),
                     "x no-cache (CPU)": r["cpu_x_rank_without_cache"], "hit@1": r.get("hit@1"),
                     "peak RSS GiB": r["peak_rss_gib"], "load 1m": r["load_at_start"][0]})
    if "rank" in runs and "generate" in runs:
        res["rank_vs_generate"] = ratio(runs["rank"]["users_per_s"], runs["generate"]["users_per_s"])
        res["rank_vs_generate_cpu"] = ratio(runs["rank"]["users_per_cpu_s"], runs["generate"]["users_per_cpu_s"])
    if "rank_bf16" in runs and "eval_ray" in runs:
        res["eval_job_vs_in_process"] = ratio(runs["eval_ray"]["users_per_s"], runs["rank_bf16"]["users_per_s"])
        res["eval_job_inner_vs_in_process"] = ratio(runs["eval_ray"]["inner_users_per_s"],
                                                    runs["rank_bf16"]["users_per_s"])
        print(f"evaluate job / in-process ranking loop (bf16, same rows): {res['eval_job_vs_in_process']}x "
              f"(inside the actor: {res['eval_job_inner_vs_in_process']}x)")
    tbl = table(rows, ["mode", "users", "users/s", "x no-cache rank", "users/CPU-s", "x no-cache (CPU)", "hit@1",
                       "peak RSS GiB", "load 1m"])
    if "score_1" in runs and "score_2" in runs:
        res["score_2_vs_1"] = ratio(runs["score_2"]["rows_per_s"], runs["score_1"]["rows_per_s"])
        srows = [{"scoring": LABELS[k], "users": runs[k]["users"], "rows": runs[k]["rows"],
                  "seconds": runs[k]["score_s"], "rows/s": runs[k]["rows_per_s"],
                  "x 1 actor": ratio(runs[k]["rows_per_s"], runs["score_1"]["rows_per_s"]),
                  "peak RSS GiB": runs[k]["peak_rss_gib"], "load 1m": runs[k]["load_at_start"][0]}
                 for k in ("score_1", "score_2")]
        tbl += "\n\n" + table(srows, ["scoring", "users", "rows", "seconds", "rows/s", "x 1 actor", "peak RSS GiB",
                                      "load 1m"])
    res["machine_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    res["table"] = tbl
    print(tbl)
    if "rank_vs_generate" in res:
        print(f"rank / generate: {res['rank_vs_generate']}x (context only: the reference's generation measured "
              f"{REFERENCE_GEN_USERS_PER_S} users/s with up to 512 tokens)")
    path = write_results("evaluate_job" if args.job else ("evaluate_quick" if args.quick else "evaluate"), res)
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
