"""Benchmark: peak memory of ranking one request with 20 vs 100 candidates (the packaged LLM, bf16).

    python -m bench.rank_memory                          # 20 and 100 candidates, SmolLM2-135M, bf16
    python -m bench.rank_memory --candidates 20,50,100 --dtype float32

Each candidate count runs in a fresh process (loaded model, one warm-up ranking of 2 candidates); the
kernel's peak-RSS counter (VmHWM) is reset after the warm-up (/proc/self/clear_refs), so `peak_gib` is
the peak of the ranking itself on top of the loaded model, and `extra_gib` = peak - RSS before it.
The prompt is the LLM-Only A-LLMRec prompt of MovieLens-100K titles (10 history items; titles from
../shared/data/movielens-100k when present, else synthetic ones of similar length), one example, the
path `LLMRecommender.rank` takes in evaluation, `allmrec score` and the service's LLM replica.
Acceptance (issue 19): peak(100) <= 1.5 x peak(20).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import loadavg, machine, table, write_results

ITEMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-100k" / "ml-100k.item"
GiB = float(1 << 30)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _titles(n: int) -> list[str]:
    if ITEMS.exists():
        rows = [line.split("\t") for line in ITEMS.read_text(encoding="utf-8", errors="replace").splitlines()[1:]]
        return [f"{r[1]} ({r[2]})" for r in rows[:n]]
    import numpy as np
    rng = np.random.default_rng(0)
    words = "star night river dark king lost city love war blue house road fire dream ghost summer".split()
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 6)))).title() + f" ({1950 + i % 50})" for i in range(n)]


def child(n: int, llm_name: str, dtype: str, threads: int) -> dict:
    import numpy as np
    import torch

    from allmrec.config import DomainConfig
    from allmrec.llm.loading import DTYPES, load_llm
    from allmrec.recommender import Example, LLMRecommender

    torch.set_num_threads(threads)
    llm, tok = load_llm(llm_name, dtype=DTYPES[dtype])
    titles = ["", *_titles(400)]
    rec = LLMRecommender(llm, tok, titles, DomainConfig("watched", "movie", "movies"), projector=None,
                         item_vectors=None, use_user_token=False, history_len=10)
    rng = np.random.default_rng(0)
    items = rng.permutation(np.arange(1, len(titles))).tolist()
    rec.rank([Example(None, items[:10], items[10:12])])  # warm-up: lazy initialisation off the measurement
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    scores = rec.rank([Example(None, items[:10], items[10:10 + n])])
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    assert np.isfinite(scores).all()
    return {"candidates": n, "rss_before_gib": before / GiB, "peak_gib": peak / GiB, "extra_gib": (peak - before) / GiB,
            "seconds": dt, "loadavg_1m": loadavg()[0]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", default="20,100", help="candidate counts, comma-separated")
    ap.add_argument("--llm", default="packaged:SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.llm, args.dtype, args.threads)), flush=True)
        return {}
    rows = []
    for n in [int(x) for x in args.candidates.split(",")]:
        out = subprocess.run([sys.executable, "-m", "bench.rank_memory", "--child", str(n), "--llm", args.llm,
                              "--dtype", args.dtype, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        rows.append(json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:]))
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["peak_vs_first"] = r["peak_gib"] / base["peak_gib"]
        r["extra_vs_first"] = r["extra_gib"] / base["extra_gib"] if base["extra_gib"] > 0 else None
    result = {"machine": machine(), "llm": args.llm, "dtype": args.dtype, "threads": args.threads, "rows": rows,
              "loadavg_end": loadavg()}
    print(table(rows, ["candidates", "rss_before_gib", "peak_gib", "extra_gib", "peak_vs_first", "extra_vs_first",
                       "seconds", "loadavg_1m"]))
    print("results:", write_results("rank_memory", result))
    return result


if __name__ == "__main__":
    main()
