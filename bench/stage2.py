"""Benchmark: Stage-2 training steps (projectors in front of the frozen LLM): the Ray Train job against
the in-process loop, the step's own variants, ours against the paper's way.

    python -m bench.stage2            # in-process bf16 loop vs the job: ZeRO-0 / ZeRO-3, 1 / 2 workers
    python -m bench.stage2 --step     # the step: SDPA vs eager attention, length bucketing, batch 8
    python -m bench.stage2 --quick    # 8 users: baseline / ours / ours_bf16, no Ray Train runs
    python -m bench.stage2 --configs baseline,ours,ours_bf16 --threads 1 --rounds 2

All on the prepared amazon-scientific set (/tmp/bench_sci), the packaged SmolLM2-135M-Instruct on the CPU
in fp32 (bf16 where the configuration says so), batch 4, Adam lr 1e-4 over the projectors, the same users /
candidates / projector initialisation in both; each configuration in its own process (its own peak RSS),
`--threads` torch threads (a 2-worker job: half each), one untimed warm-up step, then every batch timed;
users/CPU-s (process CPU time) beside users/s, since the machine is shared and wall time follows its load.
`--rounds 2` runs the plan twice, the second time in reverse order, and averages.
The prompt is A-LLMRec's (user token, 10 history + 20 candidate titles each with an item soft token).
Item vectors: the Stage-1 joint embeddings of /tmp/bench_sci when they exist, else seeded random vectors of
the same size (speed does not depend on their values).

OURS: `LLMRecommender.batch` + `stage2_loss`: every title cut to `max_title_tokens`=16 tokens, logits
computed only at the target positions (since 2026-12-06 the hidden states gathered there, then the LM head;
`logits_to_keep` before, as in the docs/benchmarks.md tables of 2026-11-22). Each in-process row also
reports tokens/s and its floor: the step's matmul FLOPs on the real tokens (forward, backward to the inputs
only, `step_flops`) at the bf16/fp32 matmul speed measured in the same process (`matmul_gflops`).
BASELINE (the same model, projector, prompt builder and examples): full titles (no cut), the LLM called
without `logits_to_keep` (logits over the whole prompt, as a plain `model(inputs_embeds=...)` call or HF's
`labels=` loss does) and the cross-entropy taken on the target positions of those full logits.
RAY TRAIN (full runs): `pipelines.stage2.stage2` (item_tokens=mlp: no Stage-1 needed) with DeepSpeed ZeRO-0
or ZeRO-3 over gloo, 1 and 2 workers, `torch_threads` = threads / workers, on `--ray-users` users, 2 epochs;
users/s and users/CPU-s of the second epoch's loop from its metrics.json (measured by the workers, CPU time
summed over ranks; the first epoch, whose first step compiles the blocks, reported beside it), and the whole
`stage2()` call's wall time (Ray Data, worker start, LLM load, checkpoints, both epochs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._stages_common import (SCI_RUN, child_main, ensure_scientific, linked_sci_run, load_cf, ratio, run_child,
                                  sci_config, wait_for_load)
from bench.common import machine, table, write_results

REFERENCE_USERS_PER_S = 0.11  # the reference code on this machine class (PAPER.md), context only
REFERENCE_PROMPT_TOKENS = 851


# ----------------------------------------------------------------------------- child side

def examples(cfg, prep, n_users: int) -> dict[str, np.ndarray]:
    """Stage-2 training examples of `n_users` seeded users, exactly as the pipeline builds them."""
    import pyarrow as pa

    from pipelines.rows import next_title_examples
    seqs = prep.sequences
    rng = np.random.default_rng(cfg.seed)
    ok = np.flatnonzero([len(s) >= 4 for s in seqs["seq"]])  # >= 2 training items
    pick = np.sort(rng.choice(ok, n_users, replace=False))
    block = pa.table({"user": seqs["user"].to_numpy()[pick], "seq": [list(map(int, seqs["seq"][i])) for i in pick]})
    return next_title_examples(block, prep.n_items, cfg.data.n_negatives, cfg.seed)


def item_vectors(cfg, n_items: int) -> tuple[np.ndarray, str]:
    from allmrec.artifacts import load_joint_embeddings
    if (SCI_RUN / "stage1" / "manifest.json").is_file():
        e, _ = load_joint_embeddings(SCI_RUN)
        return e, "Stage-1 joint embeddings"
    rng = np.random.default_rng(cfg.seed)
    return rng.random((n_items + 1, cfg.stage1.latent), dtype=np.float32), "seeded random (no Stage-1 run)"


def full_logits_loss(llm, rec, b):
    """The paper's way: logits at every position of prompt + target, CE over the target positions."""
    import torch.nn.functional as F

    from allmrec.llm.prompt import IGNORE, lm_forward
    logits, _ = lm_forward(llm, rec.embeds(b), b["attention_mask"], logits_to_keep=0)  # 0: all positions
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE)


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["impl"] == "ray":
        return run_ray(spec)
    import torch

    from allmrec.artifacts import item_titles, user_reps
    from allmrec.data.load import Prepared
    from allmrec.llm.loading import load_llm
    from allmrec.recommender import Example, LLMRecommender, build_projector

    torch.set_num_threads(spec["threads"])
    cfg = sci_config()
    s2 = cfg.stage2
    prep = Prepared(SCI_RUN / "data")
    cf, cf_desc = load_cf(cfg, prep)
    ex = examples(cfg, prep, spec["users"])
    vectors, vec_desc = item_vectors(cfg, prep.n_items)
    t0 = time.perf_counter()
    dtype = getattr(torch, spec.get("dtype", "float32"))
    llm, tok = load_llm(s2.llm, dtype=dtype)
    load_s = time.perf_counter() - t0
    if spec.get("attn"):  # "eager" | "sdpa": the attention kernel transformers runs
        llm.set_attn_implementation(spec["attn"])
    if spec.get("compile"):  # what the Stage-2 job does unless ZeRO-3 partitions the LLM (stage2.compile)
        from allmrec.llm.loading import compile_layers
        compile_layers(llm)
    torch.manual_seed(cfg.seed)
    projector = build_projector("joint", True, cf.hidden, vectors.shape[1], llm.config.hidden_size)
    ours = spec["impl"] == "ours"
    rec = LLMRecommender(llm, tok, item_titles(prep), cfg.data.domain, projector=projector, item_vectors=vectors,
                         use_user_token=True, history_len=s2.history_len,
                         max_title_tokens=s2.max_title_tokens if ours else 1_000_000)
    reps = user_reps(cf, list(ex["hist"]), ex["user"])
    exs = [Example(reps[j], ex["hist"][j], ex["cands"][j], int(ex["target"][j])) for j in range(len(ex["user"]))]
    opt = torch.optim.Adam(projector.parameters(), lr=s2.lr)
    projector.train()
    lens, padded, flops = [], [], []

    def step(batch_exs) -> float:
        b = rec.batch(batch_exs, with_target=True)
        lens.extend(b["attention_mask"].sum(1).tolist())
        padded.append(int(b["attention_mask"].shape[1]))
        flops.append(step_flops(llm, b))
        opt.zero_grad(set_to_none=True)
        if ours:
            loss = _ours_loss(rec, b)
        else:
            loss = full_logits_loss(llm, rec, b)
        loss.backward()
        opt.step()
        return float(loss.detach())

    bs = spec["batch"]
    if spec.get("bucket"):  # batches of similar prompt lengths (seeded order of the buckets): less padding
        n_tok = [len(rec.batch([e], with_target=True)["input_ids"][0]) for e in exs]
        exs = [exs[j] for j in np.argsort(n_tok, kind="stable")]
    batches = [exs[i:i + bs] for i in range(0, len(exs), bs)]
    out: dict[str, Any] = {"cf": cf_desc, "item_vectors": vec_desc, "llm_load_s": round(load_s, 2)}
    if ours:  # both losses on one batch must agree when the titles are the same (same maths, fewer logits)
        with torch.no_grad():
            b = rec.batch(batches[0], with_target=True)
            out["loss_check_abs_diff"] = float(abs(_ours_loss(rec, b) - full_logits_loss(llm, rec, b)))
    t0 = time.perf_counter()
    step(batches[0])  # warm-up
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    lens.clear()
    padded.clear()
    flops.clear()
    times, cpu, losses, n = [], [], [], 0
    for bx in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(bx))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        n += len(bx)
        if sum(times) > spec["time_cap_s"]:
            break
    loop = float(sum(times))
    out.update({"users": n, "users_planned": len(exs), "steps": len(times), "capped": n < len(exs),
                "loop_s": round(loop, 2), "users_per_s": round(n / loop, 4), "cpu_s": round(sum(cpu), 2),
                "users_per_cpu_s": round(n / sum(cpu), 4),
                "step_s_median": round(float(np.median(times)), 2),
                "prompt_tokens_mean": round(float(np.mean(lens)), 1), "prompt_tokens_max": int(np.max(lens)),
                "padded_len_mean": round(float(np.mean(padded)), 1), "final_loss": round(losses[-1], 4),
                "max_title_tokens": s2.max_title_tokens if ours else None, "threads": torch.get_num_threads(),
                "attn": llm.config._attn_implementation, "dtype": str(dtype).replace("torch.", ""),
                "compiled": bool(spec.get("compile"))})
    # the step's floor: its matmul FLOPs (real tokens only) at this process's measured matmul speed
    gflops = matmul_gflops(dtype, llm.config.hidden_size, llm.config.intermediate_size)
    step_flops_real = float(np.mean(flops))
    out.update({"tokens_per_s": round(sum(lens) / loop, 1), "matmul_gflops": round(gflops, 1),
                "step_gflop": round(step_flops_real / 1e9, 1),
                "achieved_gflops": round(step_flops_real * len(times) / loop / 1e9, 1),
                "floor_step_s": round(step_flops_real / (gflops * 1e9), 3),
                "padding_frac": round(1 - sum(lens) / (sum(padded) * bs), 3)})
    out["floor_fraction"] = round(out["floor_step_s"] / (loop / len(times)), 3)
    return out


def step_flops(llm, b) -> float:
    """Matmul FLOPs of one Stage-2 step on the real (unpadded) tokens of batch `b`: the frozen LLM's
    forward, and its backward to the inputs only (no weight gradients: dX of every linear layer costs
    what its forward costs; attention's backward ~2x its forward), causal attention (half of T^2), the
    LM head at the target positions only."""
    import torch
    H = llm.config.hidden_size
    layers = llm.get_decoder().layers if hasattr(llm, "get_decoder") else llm.model.layers
    lin = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    lens = b["attention_mask"].sum(1).double()
    tok = float(lens.sum())
    attn_fwd = float((2 * lens ** 2 * H).sum()) * len(layers)  # QK^T + AV, causal half: 2 * L^2/2 * H * 2
    n_tgt = int((b["labels"] != -100).sum(1).max()) + 1
    head = 2 * lens.numel() * n_tgt * H * llm.config.vocab_size
    return 2 * (2 * tok * lin) + 3 * attn_fwd + 2 * head


def matmul_gflops(dtype, H: int, inter: int, seconds: float = 1.5) -> float:
    """GFLOP/s of a (1600 x H) @ (H x inter) matmul in `dtype` on this process's threads (the LLM's MLP shape
    at a batch of 4 x 400 tokens), best of a few timed runs."""
    import torch
    a, w = torch.randn(1600, H, dtype=dtype), torch.randn(H, inter, dtype=dtype)
    for _ in range(3):
        a @ w
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ w
        best = max(best, 5 * 2 * 1600 * H * inter / (time.perf_counter() - t0) / 1e9)
    return best


def _ours_loss(rec, b):
    from allmrec.llm.stage2 import stage2_loss
    return stage2_loss(rec.llm, rec.projector, b, b.get("user_reps"), b.get("item_embs"), rec.prompts.placeholders)


def run_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """pipelines.stage2 on a throw-away run folder that links to /tmp/bench_sci's data and CF model."""
    from pipelines.common import init_ray
    from pipelines.stage2 import stage2
    with linked_sci_run("bench-s2-ray-") as run:
        z = spec.get("zero", 3)
        cfg = sci_config(f"run_dir={run}", f"stage2.num_workers={spec['workers']}", "stage2.epochs=2",
                         f"stage2.max_users={spec['users']}", "stage2.item_tokens=mlp",
                         f"stage2.llm_dtype={spec.get('dtype', 'float32')}", f"stage2.zero_stage={z}",
                         f"stage2.deepspeed_config=configs/deepspeed/zero{z}.json",
                         f"torch_threads={max(1, spec['threads'] // spec['workers'])}")
        t0 = time.perf_counter()
        init_ray(cfg)
        ray_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out_dir = stage2(cfg, force=True)
        wall = time.perf_counter() - t0
        metrics = json.loads((out_dir / "metrics.json").read_text())
        # epoch 2 is the job's steady rate (the in-process rows leave their warm-up step untimed, and the
        # first step of a compiled job compiles); epoch 1 is reported beside it
        first, h = metrics["history"][0], metrics["history"][-1]
        return {"workers": spec["workers"], "users": spec["users"], "users_per_s": h["users_per_s"],
                "epoch1_users_per_s": first["users_per_s"], "epoch1_s": first["seconds"],
                "users_per_cpu_s": h.get("users_per_cpu_s"), "cpu_s": h.get("cpu_s"), "zero_stage": z,
                "threads": max(1, spec["threads"] // spec["workers"]), "steps": h.get("steps"),
                "epoch_s": h["seconds"], "loss": round(h["loss"], 4), "ray_start_s": round(ray_s, 1),
                "stage2_call_s": round(wall, 1), "llm_params_full": h.get("llm_params_full"),
                "llm_params_local_per_rank": h.get("llm_params_local_per_rank"), "item_tokens": "mlp",
                "dtype": spec.get("dtype", "float32"), "compiled": cfg.stage2.compiles()}


# ----------------------------------------------------------------------------- driver

PLANS = {"baseline": {"impl": "baseline"}, "ours": {"impl": "ours"},
         "ours_bf16": {"impl": "ours", "dtype": "bfloat16"},  # CPUs with AMX / AVX512-BF16 (llm_dtype=auto)
         "ours_bf16_eager": {"impl": "ours", "dtype": "bfloat16", "attn": "eager"},
         "ours_bf16_bucket": {"impl": "ours", "dtype": "bfloat16", "bucket": True},
         "ours_bf16_b8": {"impl": "ours", "dtype": "bfloat16", "batch": 8},
         "ours_bf16_compiled": {"impl": "ours", "dtype": "bfloat16", "compile": True},
         "ours_bf16_compiled_b8": {"impl": "ours", "dtype": "bfloat16", "compile": True, "batch": 8},
         "ray_1": {"impl": "ray", "workers": 1, "zero": 0, "dtype": "bfloat16"},
         "ray_1_z3": {"impl": "ray", "workers": 1, "zero": 3, "dtype": "bfloat16"},
         "ray_2": {"impl": "ray", "workers": 2, "zero": 0, "dtype": "bfloat16"},
         "ray_2_z3": {"impl": "ray", "workers": 2, "zero": 3, "dtype": "bfloat16"}}

LABELS = {
    "baseline": "baseline: full titles, logits over the whole prompt",
    "ours": "ours: titles cut to 16 tokens, logits on target positions only",
    "ours_bf16": "in-process loop, LLM in bf16 (the reference of the Ray rows)",
    "ours_bf16_eager": "in-process, bf16, eager attention (not SDPA)",
    "ours_bf16_bucket": "in-process, bf16, batches bucketed by prompt length",
    "ours_bf16_b8": "in-process, bf16, batch 8",
    "ours_bf16_compiled": "in-process, bf16, decoder blocks compiled (the reference of compiled Ray rows)",
    "ours_bf16_compiled_b8": "in-process, bf16, compiled, batch 8",
    "ray_1": "Ray Train + DeepSpeed ZeRO-0, 1 worker, bf16",
    "ray_1_z3": "Ray Train + DeepSpeed ZeRO-3, 1 worker, bf16",
    "ray_2": "Ray Train + DeepSpeed ZeRO-0, 2 workers, bf16",
    "ray_2_z3": "Ray Train + DeepSpeed ZeRO-3, 2 workers, bf16",
}
DEFAULT_CONFIGS = ["ours_bf16", "ours_bf16_compiled", "ray_1", "ray_1_z3", "ray_2", "ray_2_z3"]
STEP_CONFIGS = ["ours_bf16", "ours_bf16_eager", "ours_bf16_compiled", "ours_bf16_compiled_b8", "ours_bf16_bucket",
                "ours_bf16_b8"]


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, run_config):
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 users, no Ray Train runs")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--ray-users", type=int, default=16, help="stage2.max_users of the Ray Train runs")
    ap.add_argument("--ray", dest="ray", action="store_true", default=None, help="run the Ray Train comparison")
    ap.add_argument("--no-ray", dest="ray", action="store_false")
    ap.add_argument("--step", action="store_true", help="the step's own variants (attention kernel, bucketing, "
                                                         "batch 8) instead of the Ray comparison")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="run the plan this many times, every other round reversed")
    ap.add_argument("--time-cap", type=float, default=240.0, help="stop a timed loop after this many seconds")
    ap.add_argument("--configs", default=None, help=f"comma-separated subset of {','.join(PLANS)}")
    ap.add_argument("--max-load", type=float, default=4.0)
    ap.add_argument("--max-wait", type=float, default=600.0)
    args = ap.parse_args(argv)
    users = args.users or (8 if args.quick else 24)
    with_ray = (not args.quick) if args.ray is None else args.ray

    if args.configs:
        names = args.configs.split(",")
    elif args.step:
        names = STEP_CONFIGS
    else:
        names = ["baseline", "ours", "ours_bf16"] if not with_ray else DEFAULT_CONFIGS
    prep_info = ensure_scientific(train_cf=any(n.startswith("ray") for n in names))  # Ray needs a CF artifact
    budget = {"left": args.max_wait}
    res: dict[str, Any] = {"benchmark": "stage2", "quick": args.quick, "machine": machine(), "prepared": prep_info,
                           "settings": {"users": users, "batch": 4, "threads": args.threads, "rounds": args.rounds,
                                        "llm": sci_config().stage2.llm,
                                        "dtype": "float32 unless the configuration says bf16", "ray_users": args.ray_users},
                           "reference_context": {"users_per_s": REFERENCE_USERS_PER_S,
                                                 "prompt_tokens_mean": REFERENCE_PROMPT_TOKENS}, "runs": {}, "all_runs": []}
    for rnd in range(args.rounds):
        for name in (names if rnd % 2 == 0 else names[::-1]):
            spec = PLANS[name]
            spec = {"batch": 4, **spec, "users": args.ray_users if spec["impl"] == "ray" else users,
                    "threads": args.threads, "time_cap_s": args.time_cap}
            gate = wait_for_load(args.max_load, budget)
            print(f"[stage2] round {rnd + 1} {name} (load {gate['load_at_start']})", flush=True)
            try:
                r = run_child("bench.stage2", spec, timeout=1800, include_ray=spec["impl"] == "ray")
            except RuntimeError as e:
                if spec["impl"] != "ray":
                    raise
                # a shared machine can run out of memory (Ray's memory monitor kills the worker): record it
                res.setdefault("failed", {})[f"{name}#{rnd + 1}"] = str(e)[-1500:]
                print(f"  failed: {str(e)[:300]}", flush=True)
                continue
            r.update(gate, round=rnd + 1, config=name)
            res["all_runs"].append(r)
            print(f"  {r['users_per_s']} users/s, {r.get('users_per_cpu_s')} users/CPU-s, "
                  f"peak RSS {r['peak_rss_gib']} GiB", flush=True)

    # per configuration: the mean over its rounds
    runs = res["runs"]
    for name in names:
        rs = [r for r in res["all_runs"] if r["config"] == name]
        if rs:
            runs[name] = {**rs[-1], "users_per_s": round(float(np.mean([r["users_per_s"] for r in rs])), 4),
                          "users_per_cpu_s": round(float(np.mean([r["users_per_cpu_s"] or 0 for r in rs])), 4),
                          "rounds": len(rs), "load_1m": [r["load_at_start"][0] for r in rs]}
    base = runs.get("baseline", {})
    rows = []
    for name, r in runs.items():
        if name.startswith("ray"):  # against the in-process loop that runs the same step: compiled (ZeRO-0/1/2) or not
            r["vs"] = "ours_bf16_compiled" if r.get("compiled") and "ours_bf16_compiled" in runs else "ours_bf16"
        else:
            r["vs"] = "ours_bf16" if name.startswith("ours_bf16") and name != "ours_bf16" else "baseline"
        vs = runs.get(r["vs"], {})
        r["ratio"] = ratio(r["users_per_s"], vs.get("users_per_s"))
        r["cpu_ratio"] = ratio(r["users_per_cpu_s"], vs.get("users_per_cpu_s"))
        rows.append({"configuration": LABELS[name], "users": r["users"], "users/s": r["users_per_s"],
                     "x ref": r["ratio"], "users/CPU-s": r.get("users_per_cpu_s"), "x ref (CPU)": r["cpu_ratio"],
                     "ref": r["vs"], "tokens/s": r.get("tokens_per_s"),
                     "floor fraction": r.get("floor_fraction"), "peak RSS GiB": r["peak_rss_gib"],
                     "load 1m": ", ".join(f"{x:.1f}" for x in r["load_1m"])})
    for w in ("1", "2"):
        if f"ray_{w}" in runs and f"ray_{w}_z3" in runs:
            res[f"ray_{w}_zero0_vs_zero3"] = ratio(runs[f"ray_{w}"]["users_per_s"], runs[f"ray_{w}_z3"]["users_per_s"])
    res["machine_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    tbl = table(rows, ["configuration", "users", "users/s", "x ref", "users/CPU-s", "x ref (CPU)", "ref", "tokens/s",
                       "floor fraction", "peak RSS GiB", "load 1m"])
    res["table"] = tbl
    print(tbl)
    print(f"(context only: the reference code measured {REFERENCE_USERS_PER_S} users/s, prompts of "
          f"{REFERENCE_PROMPT_TOKENS} tokens on average)")
    path = write_results("stage2_quick" if args.quick else ("stage2_step" if args.step else "stage2"), res)
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
