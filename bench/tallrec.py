"""Benchmark: the paper's efficiency claim, A-LLMRec vs TALLRec, training step and inference time, here.

    python -m bench.tallrec             # 16 users (4 steps / batches of 4) per configuration, 2 rounds
    python -m bench.tallrec --quick     # 8 users, 1 round

The paper (Beauty, one A6000, OPT-6.7B) reports A-LLMRec training 2.53x faster than TALLRec (232.5 vs 588.6
min) and inferring 1.71x faster (1.98 vs 3.36 s per batch). This measures the same two ratios in one run,
on the same data and model: the trained ML-100K run folder (default runs/ml100k-smollm2: data, CF
model, Stage-1 joint embeddings, Stage-2 projector; read only — a temporary run folder links to them and
holds the TALLRec adapter trained here), configs/ml100k-smollm2.yaml, the packaged SmolLM2-135M-Instruct in the
dtype `stage2.llm_dtype` resolves to (bf16 on CPUs with native bf16, else fp32), batch 4, the same seeded
users and Stage-2 examples (`pipelines.rows.next_title_examples`) for both models, AdamW lr 1e-4 (wd 0).

TRAIN (one step = build batch + forward + backward + optimizer step):
- A-LLMRec Stage-2: frozen LLM, trainable projectors F_U, F_I (fresh, seeded); the soft-token prompt
  (user token + an item token after each of the 10 history and 20 candidate titles); `stage2_loss`.
- TALLRec: LoRA (tallrec.lora_r / alpha / dropout, q_proj + v_proj) on the LLM, the LLM-Only prompt (no
  soft tokens); the very same `stage2_loss` with no projector. Its adapter is saved for the rank runs.
RANK (one batch = `LLMRecommender.rank` of 4 test users, 20 candidates each, evaluation's order), loaded
with `allmrec.artifacts.load_recommender` exactly as evaluation loads them:
- A-LLMRec: the run's trained projector + CF user representations;
- TALLRec: the adapter trained above, not merged (fp32 adapters beside the LLM, evaluation's default);
- TALLRec merged: the same adapter folded into the LLM's weights (the plain LLM's cost).
Each configuration runs in its own process (bench._stages_common.run_child: its own peak RSS, no shared
warm caches), one untimed warm-up step/batch, then every step/batch timed. With --rounds 2 the second round
runs the configurations in the reverse order, so a drift in the shared machine's load hits both models.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench._stages_common import REPO, child_main, ratio, run_child, wait_for_load
from bench.common import machine, table, write_results

ML_RUN = Path(os.environ.get("BENCH_ML_RUN", REPO / "runs" / "ml100k-smollm2"))
PARTS = ("data", "cf", "encode", "stage1", "stage2")
PAPER = {"train_ratio": 2.53, "infer_ratio": 1.71}  # TALLRec / A-LLMRec (588.6/232.5 min, 3.36/1.98 s/batch)


def bench_config(run: Path):
    from allmrec.config import load_config
    return load_config(REPO / "configs" / "ml100k-smollm2.yaml", [f"run_dir={run}", "ray.progress=false"])


# ----------------------------------------------------------------------------- child side

def _train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from allmrec.artifacts import RunFolder, item_titles, user_reps
    from allmrec.llm.loading import load_llm, resolve_dtype
    from allmrec.llm.lora import add_lora, lora_state, save_lora
    from allmrec.llm.stage2 import stage2_loss
    from allmrec.recommender import Example, LLMRecommender, build_projector
    from bench.stage2 import examples

    torch.set_num_threads(spec["threads"])
    cfg = bench_config(Path(spec["run"]))
    s2, t = cfg.stage2, cfg.tallrec
    rf = RunFolder(cfg)
    prep = rf.prepared()
    ex = examples(cfg, prep, spec["users"])  # seeded users, Stage-2's own example builder
    dtype = resolve_dtype(s2.llm_dtype, "cpu")
    llm, tok = load_llm(s2.llm, dtype=dtype)
    torch.manual_seed(cfg.seed)
    titles = item_titles(prep)
    if spec["model"] == "allmrec":
        cf = rf.load_cf().requires_grad_(False)
        vectors = rf.item_vectors(cf)  # stage2.item_tokens=joint: Stage-1's e_i
        projector = build_projector("joint", True, cf.hidden, vectors.shape[1], llm.config.hidden_size)
        rec = LLMRecommender(llm, tok, titles, cfg.data.domain, projector=projector, item_vectors=vectors,
                             use_user_token=True, history_len=s2.history_len, max_title_tokens=s2.max_title_tokens)
        reps = user_reps(cf, list(ex["hist"]), ex["user"])
        params = list(projector.parameters())
        projector.train()
    else:
        llm = add_lora(llm, t.lora_r, t.lora_alpha, t.lora_dropout, t.target_modules or None)
        rec = LLMRecommender(llm, tok, titles, cfg.data.domain, projector=None, item_vectors=None,
                             use_user_token=False, history_len=s2.history_len, max_title_tokens=s2.max_title_tokens)
        reps = None
        params = [p for p in llm.parameters() if p.requires_grad]
    llm.train()  # as the Ray job's engine.train(): LoRA dropout on (SmolLM2 itself has no dropout)
    opt = torch.optim.AdamW(params, lr=s2.lr, weight_decay=0.0)
    exs = [Example(None if reps is None else reps[j], ex["hist"][j], ex["cands"][j], int(ex["target"][j]))
           for j in range(len(ex["user"]))]
    lens: list[int] = []

    def step(batch_exs) -> float:
        b = rec.batch(batch_exs, with_target=True)
        lens.extend(b["attention_mask"].sum(1).tolist())
        opt.zero_grad(set_to_none=True)
        loss = stage2_loss(rec.llm, rec.projector, b, b.get("user_reps"), b.get("item_embs"),
                           rec.prompts.placeholders)
        loss.backward()
        opt.step()
        return float(loss.detach())

    bs = spec["batch"]
    batches = [exs[i:i + bs] for i in range(0, len(exs), bs)]
    t0 = time.perf_counter()
    step(batches[0])  # warm-up
    out: dict[str, Any] = {"warmup_s": round(time.perf_counter() - t0, 2)}
    lens.clear()
    times, cpu, losses = [], [], []
    for bx in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(bx))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if sum(times) > spec["time_cap_s"]:
            break
    if spec.get("save"):  # the adapter the rank runs load (evaluation's path: <run>/tallrec/lora.safetensors)
        rf.tallrec.mkdir(parents=True, exist_ok=True)
        save_lora(lora_state(llm), rf.lora_path)
    out.update({"times": [round(x, 3) for x in times], "cpu": [round(x, 3) for x in cpu],
                "users": sum(len(b) for b in batches[:len(times)]), "final_loss": round(losses[-1], 4),
                "prompt_tokens_mean": round(float(np.mean(lens)), 1),
                "trainable_params": int(sum(p.numel() for p in params)), "dtype": str(dtype).replace("torch.", ""),
                "threads": torch.get_num_threads()})
    return out


def _rank(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from allmrec.artifacts import load_recommender, user_reps
    from allmrec.recommender import Example, candidate_order
    from pipelines.evaluate import seeded_subset as _subset

    torch.set_num_threads(spec["threads"])
    cfg = bench_config(Path(spec["run"]))
    variant = "tallrec" if spec["model"].startswith("tallrec") else spec["model"]
    t0 = time.perf_counter()
    rec, cf, prep = load_recommender(cfg, variant)
    if spec["model"] == "tallrec_merged":
        from peft.tuners.lora import LoraLayer
        for m in rec.llm.modules():
            if isinstance(m, LoraLayer):
                m.merge()
    load_s = time.perf_counter() - t0
    # seeded test users, their candidates in evaluation's order, x_u from the CF model (as LLMScorer does)
    test = _subset(prep.candidates("test"), spec["users"], cfg.seed)
    hists = [np.asarray(h) for h in test["history"]]
    reps = user_reps(cf, hists, test["user"].to_numpy()) if rec.use_user_token else None
    exs, gold = [], []
    for j, (u, t, negs) in enumerate(zip(test["user"], test["target"], test["negatives"])):
        c = candidate_order([int(t), *map(int, negs)], cfg.seed, user=int(u))
        exs.append(Example(None if reps is None else reps[j], hists[j], c, int(t)))
        gold.append(c.index(int(t)))
    gold = np.asarray(gold)
    bs = spec["batch"]
    batches = [exs[i:i + bs] for i in range(0, len(exs), bs)]
    prompt_lens = [int(rec.batch([e], with_target=False)["attention_mask"].sum()) for e in exs]
    t0 = time.perf_counter()
    rec.rank(batches[0])  # warm-up
    out: dict[str, Any] = {"load_s": round(load_s, 2), "warmup_s": round(time.perf_counter() - t0, 2)}
    times, cpu, scores = [], [], []
    for bx in batches:
        t0, c0 = time.perf_counter(), time.process_time()
        scores.append(rec.rank(bx))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if sum(times) > spec["time_cap_s"]:
            break
    s = np.concatenate(scores)
    out.update({"times": [round(x, 3) for x in times], "cpu": [round(x, 3) for x in cpu], "users": len(s),
                "hit@1": round(float(np.mean(s.argmax(1) == gold[:len(s)])), 4),
                "prompt_tokens_mean": round(float(np.mean(prompt_lens)), 1),
                "dtype": str(next(rec.llm.parameters()).dtype).replace("torch.", ""),
                "threads": torch.get_num_threads()})
    return out


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    return _train(spec) if spec["mode"] == "train" else _rank(spec)


# ----------------------------------------------------------------------------- driver

LABELS = {("train", "allmrec"): "train step: A-LLMRec Stage-2 (projectors, frozen LLM, soft-token prompt)",
          ("train", "tallrec"): "train step: TALLRec (LoRA on the LLM, LLM-Only prompt)",
          ("rank", "allmrec"): "rank batch: A-LLMRec (trained projector)",
          ("rank", "tallrec"): "rank batch: TALLRec, adapters not merged",
          ("rank", "tallrec_merged"): "rank batch: TALLRec, adapters merged into the LLM"}


def _plan(rounds: int) -> list[tuple[str, str]]:
    first = [("train", "allmrec"), ("train", "tallrec"), ("rank", "allmrec"), ("rank", "tallrec"),
             ("rank", "tallrec_merged")]
    # round 2 reverses each pair's order (TALLRec's training stays before any TALLRec rank: it saves the adapter)
    second = [("train", "tallrec"), ("train", "allmrec"), ("rank", "tallrec_merged"), ("rank", "tallrec"),
              ("rank", "allmrec")]
    return [c for r in range(rounds) for c in (first if r % 2 == 0 else second)]


def _make_run(src: Path) -> Path:
    """A temporary run folder whose data/cf/encode/stage1/stage2 are links to `src` (nothing is copied
    into or written to `src`); the TALLRec child writes its adapter to <tmp>/tallrec/."""
    from allmrec.artifacts import RunFolder
    rf = RunFolder(bench_config(src))
    missing = [name for name, d in (("data", rf.data), ("stage1", rf.stage1), ("stage2", rf.stage2()))
               if rf.manifest(d) is None] + ([] if rf.cf_found() else ["cf"])
    if missing or not rf.projector_path().is_file():
        raise FileNotFoundError(f"{src} lacks a finished {missing or ['stage2 projector']}: run "
                                f"`allmrec run --config configs/ml100k-smollm2.yaml --no-serve` first")
    run = Path(tempfile.mkdtemp(prefix="bench-tallrec-"))
    for p in PARTS:
        if (src / p).exists():
            (run / p).symlink_to((src / p).resolve())
    return run


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, run_config):
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="8 users, 1 round")
    ap.add_argument("--users", type=int, default=None, help="users per configuration (steps/batches of 4)")
    ap.add_argument("--rounds", type=int, default=None, help="1, or 2 (second round in reverse order)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per child (1: a shared 2-core machine punishes 2 threads, docs)")
    ap.add_argument("--time-cap", type=float, default=300.0, help="stop a timed loop after this many seconds")
    ap.add_argument("--max-load", type=float, default=4.0)
    ap.add_argument("--max-wait", type=float, default=120.0)
    ap.add_argument("--run", type=Path, default=ML_RUN, help="the trained ML-100K run folder (read only)")
    args = ap.parse_args(argv)
    users = args.users or (8 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 2)
    run = _make_run(args.run)
    cfg = bench_config(run)
    from allmrec.llm.loading import resolve_dtype
    res: dict[str, Any] = {
        "benchmark": "tallrec", "quick": args.quick, "machine": machine(), "run": str(args.run),
        "settings": {"users": users, "batch": 4, "rounds": rounds, "threads": args.threads, "llm": cfg.stage2.llm,
                     "llm_dtype": str(resolve_dtype(cfg.stage2.llm_dtype, "cpu")).replace("torch.", ""),
                     "lr": cfg.stage2.lr, "lora": {"r": cfg.tallrec.lora_r, "alpha": cfg.tallrec.lora_alpha,
                                                   "dropout": cfg.tallrec.lora_dropout},
                     "history_len": cfg.stage2.history_len, "max_title_tokens": cfg.stage2.max_title_tokens},
        "paper": PAPER, "runs": []}
    budget = {"left": args.max_wait}
    try:
        for mode, model in _plan(rounds):
            spec = {"mode": mode, "model": model, "users": users, "batch": 4, "threads": args.threads,
                    "time_cap_s": args.time_cap, "run": str(run), "save": (mode, model) == ("train", "tallrec")}
            gate = wait_for_load(args.max_load, budget)
            print(f"[tallrec] {mode} {model} (load {gate['load_at_start']})", flush=True)
            r = run_child("bench.tallrec", spec, timeout=1800)
            r.update(gate, mode=mode, model=model)
            res["runs"].append(r)
            print(f"  median {np.median(r['times']):.2f} s per {'step' if mode == 'train' else 'batch'}, "
                  f"peak RSS {r['peak_rss_gib']} GiB", flush=True)
    finally:
        shutil.rmtree(run, ignore_errors=True)

    rows, med, med_cpu = [], {}, {}
    for key, label in LABELS.items():
        rs = [r for r in res["runs"] if (r["mode"], r["model"]) == key]
        if not rs:
            continue
        times = [x for r in rs for x in r["times"]]
        cpu = [x for r in rs for x in r["cpu"]]
        med[key], med_cpu[key] = float(np.median(times)), float(np.median(cpu))
        rows.append({"configuration": label, "timed": len(times), "median s": round(med[key], 3),
                     "mean s": round(float(np.mean(times)), 3), "CPU s (median)": round(med_cpu[key], 3),
                     "prompt tokens": rs[0]["prompt_tokens_mean"], "trainable params": rs[0].get("trainable_params"),
                     "hit@1": rs[0].get("hit@1"), "peak RSS GiB": max(r["peak_rss_gib"] for r in rs),
                     "load 1m": " / ".join(str(r["load_at_start"][0]) for r in rs)})
    # ratio per round too: both models of a round ran minutes apart, so their ratio shows the load's noise
    per_round = {}
    for mode, b in (("train", "tallrec"), ("rank", "tallrec"), ("rank", "tallrec_merged")):
        a = [float(np.median(r["times"])) for r in res["runs"] if (r["mode"], r["model"]) == (mode, "allmrec")]
        t = [float(np.median(r["times"])) for r in res["runs"] if (r["mode"], r["model"]) == (mode, b)]
        per_round[f"{mode}:{b}/allmrec"] = [ratio(y, x) for x, y in zip(a, t)]
    # wall-clock ratios, and CPU-time ratios (1 thread: the CPU time a step needs; less sensitive to
    # what else the shared machine runs at that moment)
    pairs = {"train_tallrec_over_allmrec": (("train", "tallrec"), ("train", "allmrec")),
             "rank_tallrec_over_allmrec": (("rank", "tallrec"), ("rank", "allmrec")),
             "rank_tallrec_merged_over_allmrec": (("rank", "tallrec_merged"), ("rank", "allmrec"))}
    res["ratios"] = {k: ratio(med.get(a), med.get(b)) for k, (a, b) in pairs.items()}
    res["ratios_cpu"] = {k: ratio(med_cpu.get(a), med_cpu.get(b)) for k, (a, b) in pairs.items()}
    res["ratios"]["per_round"] = per_round
    res["machine_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    cols = ["configuration", "timed", "median s", "mean s", "CPU s (median)", "prompt tokens", "trainable params",
            "hit@1", "peak RSS GiB", "load 1m"]
    res["table"] = table(rows, cols)
    ratios = []
    for (k, label, rnd, paper) in (
            ("train_tallrec_over_allmrec", "training step, TALLRec / A-LLMRec", "train:tallrec/allmrec",
             PAPER["train_ratio"]),
            ("rank_tallrec_over_allmrec", "rank batch, TALLRec (not merged) / A-LLMRec", "rank:tallrec/allmrec",
             PAPER["infer_ratio"]),
            ("rank_tallrec_merged_over_allmrec", "rank batch, TALLRec (merged) / A-LLMRec",
             "rank:tallrec_merged/allmrec", None)):
        ratios.append({"comparison": label, "here (wall)": res["ratios"][k], "here (CPU time)": res["ratios_cpu"][k],
                       "wall, per round": per_round[rnd], "paper": paper})
    res["ratio_table"] = table(ratios, ["comparison", "here (wall)", "here (CPU time)", "wall, per round", "paper"])
    print(res["table"])
    print()
    print(res["ratio_table"])
    path = write_results("tallrec_quick" if args.quick else "tallrec", res)
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
