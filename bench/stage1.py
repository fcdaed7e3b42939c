"""Benchmark: Stage-1 training steps (SBERT fine-tuning + aligner), ours vs a plain reference-style loop.

    python -m bench.stage1            # 320 users (10 steps of 32) per configuration
    python -m bench.stage1 --quick    # 64 users
    python -m bench.stage1 --configs ours_top1,ray_top1 --users 320   # the Stage-1 job against its loop

All on the prepared amazon-scientific set (/tmp/bench_sci), the packaged all-MiniLM-L6-v2, batch 32,
Adam lr 1e-4, the same users, negatives and frozen SASRec in every configuration; each configuration in
its own process (its own peak RSS), 2 torch threads. One untimed warm-up step, then every batch timed.

OURS (allmrec.align): `Stage1Model` with the texts tokenized once into a `TokenCache`, each distinct item
of a batch encoded once, no checkpoint inside the loop (the pipeline saves once per epoch);
`sbert_trainable_layers` -1 (full fine-tune) and 1 (top layer only; the five frozen layers run once per
item in `precompute_lower`, reported as set-up time).
BASELINE (written here, the reference's way): the SentenceTransformer itself fine-tuned in full, every
step re-tokenizes the batch's texts with its tokenizer and encodes all of them (repeats included), same
losses as ours; with and without `torch.save` of the whole SBERT + aligner every 10 steps (the
reference saves every max(10, batches/100) steps, from step 0). REFERENCE-LIKE (full runs): the
reference's step as published: the negatives' texts are encoded too and enter its losses (matching and
text reconstruction over positives and negatives), SBERT's own 256-token limit, saves every 10 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

from bench._stages_common import (SCI_RUN, child_main, ensure_scientific, linked_sci_run, load_cf, ratio, run_child,
                                  sci_config, wait_for_load)
from bench.common import machine, table, write_results

REFERENCE_USERS_PER_S = 1.36  # the reference code on this machine class (PAPER.md), context only
SAVE_EVERY = 10


# ----------------------------------------------------------------------------- child side

def _examples(cfg, prep, n_users: int, seed: int) -> dict[str, np.ndarray]:
    """One example per user (its last training item after the rest of its training history), seeded."""
    from allmrec.cf.data import pad_left, sample_negatives
    seqs = [np.asarray(s, dtype=np.int64) for s in prep.sequences["seq"]]
    users = prep.sequences["user"].to_numpy()
    ok = np.flatnonzero([len(s) - 2 >= 2 for s in seqs])
    rng = np.random.default_rng(seed)
    pick = rng.permutation(rng.choice(ok, n_users, replace=False))
    hist = [seqs[i][:-3] for i in pick]  # training part s[:-2] without its last item
    pos = np.array([seqs[i][-3] for i in pick], dtype=np.int64)
    neg = sample_negatives(pos[:, None], [seqs[i] for i in pick], prep.n_items, rng)[:, 0]
    return {"user": users[pick], "seq": pad_left(hist, cfg.cf.max_len), "pos": pos, "neg": neg}


def _item_texts(prep) -> list[str]:
    texts = [""] * (prep.n_items + 1)  # row = item id, row 0 = padding
    for i, t in zip(prep.items["item"], prep.items["text"]):
        texts[int(i)] = str(t)
    return texts


def reference_losses(aligner, x_u, E_pos, E_neg, Q_pos, Q_neg, alpha: float = 0.5, beta: float = 0.2):
    """The reference implementation's Stage-1 loss (negatives' texts included; its rec logits are means)."""
    import torch
    import torch.nn.functional as F
    e_pos, e_neg = aligner.item_enc(E_pos), aligner.item_enc(E_neg)
    E_pos_hat, E_neg_hat = aligner.item_dec(e_pos), aligner.item_dec(e_neg)
    q_pos, q_neg = aligner.text_enc(Q_pos), aligner.text_enc(Q_neg)
    pos_l, neg_l = (x_u * E_pos_hat).mean(1), (x_u * E_neg_hat).mean(1)
    rec = F.binary_cross_entropy_with_logits(pos_l, torch.ones_like(pos_l)) \
        + F.binary_cross_entropy_with_logits(neg_l, torch.zeros_like(neg_l))
    matching = F.mse_loss(e_pos, q_pos) + F.mse_loss(e_neg, q_neg)
    recon = F.mse_loss(E_pos_hat, E_pos) + F.mse_loss(E_neg_hat, E_neg)
    text_recon = F.mse_loss(aligner.text_dec(q_pos), Q_pos.detach()) \
        + F.mse_loss(aligner.text_dec(q_neg), Q_neg.detach())
    return rec + matching + alpha * recon + beta * text_recon


def run_ray(spec: dict[str, Any]) -> dict[str, Any]:
    """`pipelines.stage1.stage1` (Ray Train + DeepSpeed ZeRO-0, 1 worker) on a throw-away run folder linking
    /tmp/bench_sci's data and CF model: `spec["users"]` seeded users, 2 epochs; the second epoch's users/s is
    the job's steady rate (the first holds the worker's warm-up), the whole call's wall time beside it."""
    from pipelines.common import init_ray
    from pipelines.stage1 import stage1
    with linked_sci_run("bench-s1-ray-") as run:
        cfg = sci_config(f"run_dir={run}", "stage1.epochs=2", f"stage1.max_users={spec['users']}",
                         f"stage1.sbert_trainable_layers={spec['layers']}", "stage1.num_workers=1",
                         f"torch_threads={spec['threads']}")
        init_ray(cfg)
        t0 = time.perf_counter()
        out_dir = stage1(cfg, force=True)
        wall = time.perf_counter() - t0
        hist = json.loads((out_dir / "metrics.json").read_text())["history"]
        first, h = hist[0], hist[-1]
        return {"users": spec["users"], "users_per_s": h["users_per_s"], "epoch_s": h["seconds"],
                "epoch1_users_per_s": first["users_per_s"], "stage1_call_s": round(wall, 1),
                "users_per_cpu_s": None, "setup_s": round(wall - sum(x["seconds"] for x in hist), 1),
                "users_per_s_with_setup": round(len(hist) * spec["users"] / wall, 3), "threads": spec["threads"]}


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (child) process: set-up, one warm-up step, then the timed steps."""
    if spec["impl"] == "ray":
        return run_ray(spec)
    import torch

    from allmrec.align.sbert import TextEncoder, load_sbert, sbert_dim
    from allmrec.align.stage1 import Stage1Aligner, Stage1Model, stage1_losses
    from allmrec.data.load import Prepared

    torch.set_num_threads(spec["threads"])
    cfg = sci_config()
    prep = Prepared(SCI_RUN / "data")
    cf, cf_desc = load_cf(cfg, prep)
    ex = _examples(cfg, prep, spec["users"], cfg.seed)
    texts = _item_texts(prep)
    with torch.no_grad():
        E = cf.item_embeddings().detach()
    s1, impl, bs = cfg.stage1, spec["impl"], spec["batch"]
    out: dict[str, Any] = {"cf": cf_desc, "distinct_pos_items": int(len(np.unique(ex["pos"])))}

    t0 = time.perf_counter()
    st = load_sbert(cfg.encode.model)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    if impl == "ours":
        # the work ours adds before training: tokenize every item once, run frozen layers once per item
        te = TextEncoder(st, trainable_layers=spec["layers"])
        model = Stage1Model.from_config(s1, cf.hidden, te)
        te.pretokenize(texts, cfg.encode.max_seq_length)
        te.precompute_lower(64, items=torch.from_numpy(np.unique(ex["pos"])))
        params = model.trainable_parameters()
        modules = [model]
    else:
        st.max_seq_length = spec["max_len"]
        aligner = Stage1Aligner(cf.hidden, sbert_dim(st), s1.latent)
        params = [p for p in [*st.parameters(), *aligner.parameters()] if p.requires_grad]
        modules = [st, aligner]
    out["setup_s"] = round(time.perf_counter() - t0, 2)
    out["trainable_params"] = int(sum(p.numel() for p in params))
    opt = torch.optim.Adam(params, lr=s1.lr)
    for m in modules:
        m.train()
    save_dir = tempfile.mkdtemp(prefix="bench-s1-save-")
    tokens_seen = []

    def encode(ids: np.ndarray) -> torch.Tensor:
        # the reference's way: tokenize the batch's texts now, encode every one of them
        f = st.tokenize([texts[int(i)] for i in ids])
        tokens_seen.append(int(f["attention_mask"].shape[1]))
        return st({"input_ids": f["input_ids"], "attention_mask": f["attention_mask"]})["sentence_embedding"]

    def step(idx: np.ndarray, k: int) -> float:
        pos, neg = ex["pos"][idx], ex["neg"][idx]
        with torch.no_grad():
            x_u = cf.user_representation(torch.from_numpy(ex["seq"][idx]), torch.from_numpy(ex["user"][idx]))
        pos_t, neg_t = torch.from_numpy(pos), torch.from_numpy(neg)
        opt.zero_grad(set_to_none=True)
        if impl == "ours":
            loss = model({"pos_items": pos_t, "neg_items": neg_t, "x_u": x_u, "E_pos": E[pos_t],
                          "E_neg": E[neg_t]})["total"]
        elif impl == "plain":
            loss = stage1_losses(aligner, E[pos_t], E[neg_t], encode(pos), x_u, s1.alpha, s1.beta)["total"]
        else:  # reference
            loss = reference_losses(aligner, x_u, E[pos_t], E[neg_t], encode(pos), encode(neg))
        loss.backward()
        opt.step()
        if spec["save_every"] and k % spec["save_every"] == 0:
            torch.save(st.state_dict(), os.path.join(save_dir, "sbert.pt"))
            torch.save(aligner.state_dict(), os.path.join(save_dir, "mlp.pt"))
        return float(loss.detach())

    n = len(ex["pos"])
    batches = [np.arange(i, min(i + bs, n)) for i in range(0, n, bs)]
    t0 = time.perf_counter()
    step(batches[0], 1)  # warm-up (allocations, Adam state); k=1: no save
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    tokens_seen.clear()
    times, cpu, losses, n = [], [], [], 0
    for k, idx in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(idx, k))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        n += len(idx)
        if sum(times) > spec["time_cap_s"]:  # bounded run on an overloaded machine (recorded)
            break
    loop = float(sum(times))
    out.update({"users": n, "users_planned": len(ex["pos"]), "steps": len(times), "loop_s": round(loop, 2),
                "capped": n < len(ex["pos"]),
                "users_per_s": round(n / loop, 3), "cpu_s": round(sum(cpu), 2),
                "users_per_cpu_s": round(n / sum(cpu), 3),
                "users_per_s_with_setup": round(n / (loop + out["setup_s"]), 3),
                "step_s_median": round(float(np.median(times)), 3), "final_loss": round(losses[-1], 4),
                "mean_padded_len": round(float(np.mean(tokens_seen)), 1) if tokens_seen else None,
                "threads": torch.get_num_threads()})
    return out


# ----------------------------------------------------------------------------- driver

CONFIGS = {
    "ours_full": {"impl": "ours", "layers": -1, "save_every": 0},
    "ours_top1": {"impl": "ours", "layers": 1, "save_every": 0},
    "baseline": {"impl": "plain", "layers": -1, "save_every": 0},
    "baseline_save": {"impl": "plain", "layers": -1, "save_every": SAVE_EVERY},
    "reference_like": {"impl": "reference", "layers": -1, "save_every": SAVE_EVERY},
    "ray_top1": {"impl": "ray", "layers": 1, "save_every": 0},
}
LABELS = {
    "baseline": "baseline: plain loop, full SBERT, re-tokenize + encode every text",
    "baseline_save": "baseline + full SBERT save every 10 steps",
    "reference_like": "reference-like: + negatives' texts encoded, 256-token limit, save every 10",
    "ours_full": "ours: TokenCache + distinct items, full SBERT (layers=-1)",
    "ours_top1": "ours: TokenCache + distinct items, top-1 layer (layers=1)",
    "ray_top1": "the Stage-1 job (Ray Train + DeepSpeed ZeRO-0, 1 worker), top-1 layer: epoch 2",
}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if child_main(argv, run_config):
        return {}
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 users, no reference-like run")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=4.0, help="wait while the 1-min load is above this")
    ap.add_argument("--max-wait", type=float, default=600.0, help="total seconds of waiting for a quiet machine")
    ap.add_argument("--time-cap", type=float, default=150.0,
                    help="stop a configuration's timed loop after this many seconds (whole steps; recorded)")
    ap.add_argument("--configs", default=None, help="comma-separated subset of " + ",".join(CONFIGS))
    args = ap.parse_args(argv)

    users = args.users or (64 if args.quick else 320)
    names = args.configs.split(",") if args.configs else \
        ["baseline", "baseline_save", "ours_full", "ours_top1"] + ([] if args.quick else ["reference_like"])
    cfg = sci_config()
    prep_info = ensure_scientific(train_cf=any(CONFIGS[n]["impl"] == "ray" for n in names))  # the job needs a CF model
    budget = {"left": args.max_wait}
    res: dict[str, Any] = {"benchmark": "stage1", "quick": args.quick, "machine": machine(), "prepared": prep_info,
                           "settings": {"users": users, "batch": 32, "lr": cfg.stage1.lr, "threads": args.threads,
                                        "ours_max_seq_length": cfg.encode.max_seq_length, "save_every": SAVE_EVERY,
                                        "sbert": cfg.encode.model},
                           "reference_users_per_s_context": REFERENCE_USERS_PER_S, "runs": {}}
    for name in names:
        spec = {**CONFIGS[name], "users": users, "batch": 32, "threads": args.threads, "time_cap_s": args.time_cap,
                "max_len": 256 if name == "reference_like" else cfg.encode.max_seq_length}
        gate = wait_for_load(args.max_load, budget)
        print(f"[stage1] {name} (load {gate['load_at_start']})", flush=True)
        r = run_child("bench.stage1", spec, include_ray=spec["impl"] == "ray")
        r.update(gate)
        res["runs"][name] = r
        print(f"  {r['users_per_s']} users/s, setup {r['setup_s']} s, peak RSS {r['peak_rss_gib']} GiB", flush=True)

    base = res["runs"].get("baseline", {})
    rows = []
    if "ray_top1" in res["runs"] and "ours_top1" in res["runs"]:  # the job against its own in-process loop
        res["job_vs_in_process"] = ratio(res["runs"]["ray_top1"]["users_per_s"], res["runs"]["ours_top1"]["users_per_s"])
    for name, r in res["runs"].items():
        r["speedup_vs_baseline"] = ratio(r["users_per_s"], base.get("users_per_s"))
        r["cpu_speedup_vs_baseline"] = ratio(r["users_per_cpu_s"], base.get("users_per_cpu_s"))
        rows.append({"configuration": LABELS[name], "users": r["users"], "users/s": r["users_per_s"],
                     "x baseline": r["speedup_vs_baseline"], "users/CPU-s": r["users_per_cpu_s"],
                     "x baseline (CPU)": r["cpu_speedup_vs_baseline"], "set-up s": r["setup_s"],
                     "users/s incl. set-up": r["users_per_s_with_setup"], "peak RSS GiB": r["peak_rss_gib"],
                     "load 1m": r["load_at_start"][0]})
    res["machine_end"] = {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    tbl = table(rows, ["configuration", "users", "users/s", "x baseline", "users/CPU-s", "x baseline (CPU)", "set-up s",
                       "users/s incl. set-up", "peak RSS GiB", "load 1m"])
    res["table"] = tbl
    print(tbl)
    if "job_vs_in_process" in res:
        print(f"the Stage-1 job's epoch 2 against the in-process top-1 loop: {res['job_vs_in_process']}x")
    print(f"(context only: the reference code measured {REFERENCE_USERS_PER_S} users/s on this machine class)")
    path = write_results("stage1_quick" if args.quick else "stage1", res)
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    main()
