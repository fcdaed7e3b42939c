"""Benchmark: Ray actor-pool SBERT encode (`pipelines.encode.encode`) vs one `SentenceTransformer.encode` call.

    python -m bench.encode            # all prepared amazon-scientific items (4,344)
    python -m bench.encode --quick    # the first 500 of them

Same item texts (the prepared `items.parquet` "text" column), same packaged all-MiniLM-L6-v2, same
max_seq_length (128) and batch size (64), in the same run. The baseline runs first, in this process,
before Ray starts, twice: with torch threads = cores (what 1 actor gets) and with 1 thread (what each
of 2 actors gets on 2 cores); then Ray is started once (timed on its own) and `encode` runs with 1 and
2 actors.
Ray's items/s include what the job itself does (count, repartition, one model load per actor,
writing parquet); the baseline's are given for the encode call alone and with its model load.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import PeakRSS, loadavg, machine, prepared_scientific, table, write_results

MODEL = "packaged:all-MiniLM-L6-v2"


def _subset_run(cfg, n: int, dest: Path):
    """A run folder whose prepared data holds only the first `n` items (what encode reads: items + manifest)."""
    import pyarrow.parquet as pq

    from allmrec.artifacts import RunFolder
    from allmrec.config import load_config
    from allmrec.data import schema

    src = RunFolder(cfg).data
    out = load_config(None, [f"{k}={v}" for k, v in (("run_dir", dest), ("data.format", cfg.data.format),
                                                    ("data.path", cfg.data.path), ("ray.progress", "false"))])
    dst = RunFolder(out).data
    dst.mkdir(parents=True, exist_ok=True)
    items = pq.read_table(src / schema.ITEMS).sort_by("item").slice(0, n)
    pq.write_table(items, dst / schema.ITEMS)
    m = json.loads((src / schema.MANIFEST).read_text())
    m["fingerprint"] = f"{m['fingerprint']}-first{n}"
    (dst / schema.MANIFEST).write_text(json.dumps(m))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="500 items instead of all")
    ap.add_argument("--items", type=int, default=None, help="encode only the first N items")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args(argv)
    n_limit = a.items or (500 if a.quick else None)
    mach = machine()
    print(f"machine: {mach['cpu_model']}, {mach['logical_cores']} cores, {mach['ram_gib']} GiB; "
          f"load average {mach['loadavg_1_5_15']}")
    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        import pyarrow.parquet as pq
        import torch

        from allmrec.align.sbert import load_sbert
        from allmrec.data import schema
        from allmrec.data.load import read_parquet
        from allmrec.artifacts import RunFolder
        from pipelines.common import init_ray, setup_logging
        from pipelines.encode import encode

        setup_logging()
        cfg, prep_s = prepared_scientific(work / "run")  # starts Ray: the baseline must not run beside it
        import ray
        ray.shutdown()
        if n_limit:
            cfg = _subset_run(cfg, n_limit, work / "subset")
        items = pq.read_table(RunFolder(cfg).data / schema.ITEMS).sort_by("item")
        texts = items["text"].to_pylist()
        n = len(texts)
        print(f"data: prepared amazon-scientific ({prep_s:.0f} s to prepare, not timed): {n:,} item texts")

        rows, runs = [], {}
        # baseline: one process, one encode call over all texts
        cores = os.cpu_count() or 1
        for key, threads in (("baseline", cores), ("baseline_1thread", 1)):
            if key == "baseline_1thread" and cores == 1:
                continue
            gc.collect()
            torch.set_num_threads(threads)
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                model = load_sbert(MODEL)
                model.max_seq_length = cfg.encode.max_seq_length
                t1 = time.perf_counter()
                emb = model.encode(texts, batch_size=a.batch_size, convert_to_numpy=True, show_progress_bar=False)
                t2 = time.perf_counter()
            if key == "baseline":
                base = emb  # the reference the Ray outputs are compared with
            runs[key] = {"load_s": round(t1 - t0, 2), "encode_s": round(t2 - t1, 2),
                         "items_per_s": round(n / (t2 - t1), 1), "items_per_s_with_load": round(n / (t2 - t0), 1),
                         "threads": torch.get_num_threads(), **mem.result(), "loadavg": loadavg()}
            rows.append({"impl": "baseline: SentenceTransformer.encode", "actors": "-", "threads": threads,
                         "items_per_s": runs[key]["items_per_s"],
                         "items_per_s_incl_load": runs[key]["items_per_s_with_load"],
                         "wall_s": round(t2 - t0, 2), "peak_rss_gib": runs[key]["peak_rss_gib"]})
            del model
        gc.collect()

        t0 = time.perf_counter()
        init_ray(cfg)
        startup = time.perf_counter() - t0
        runs["ray_startup_s"] = round(startup, 2)
        for actors in (1, 2):
            cfg.encode.num_actors = actors
            cfg.encode.batch_size = a.batch_size
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = encode(cfg, force=True)
                wall = time.perf_counter() - t0
            m = json.loads((out / schema.MANIFEST).read_text())
            got = np.stack(read_parquet(out / schema.TEXT_EMB, "item")["emb"].to_numpy())
            diff = float(np.abs(got - base).max()) if got.shape == base.shape else None
            runs[f"ray_{actors}"] = {"wall_s": round(wall, 2), "manifest": m, "max_abs_diff_vs_baseline": diff,
                                     **mem.result(), "loadavg": loadavg()}
            rows.append({"impl": "ours: Ray Data actor pool", "actors": actors, "threads": max(1, cores // actors),
                         "items_per_s": round(n / wall, 1),
                         "items_per_s_incl_load": round(n / wall, 1), "wall_s": round(wall, 2),
                         "peak_rss_gib": runs[f"ray_{actors}"]["peak_rss_gib"], "max_abs_diff": diff})
        b = runs["baseline"]
        ratios = {f"ray_{k}_actor_over_baseline_encode_only":
                  round((n / runs[f"ray_{k}"]["wall_s"]) / b["items_per_s"], 2) for k in (1, 2)}
        ratios |= {f"ray_{k}_actor_over_baseline_with_load": round((n / runs[f"ray_{k}"]["wall_s"])
                                                                   / b["items_per_s_with_load"], 2) for k in (1, 2)}
        if "baseline_1thread" in runs:
            b1 = runs["baseline_1thread"]
            ratios |= {f"ray_{k}_actor_over_baseline_1thread_encode_only":
                       round((n / runs[f"ray_{k}"]["wall_s"]) / b1["items_per_s"], 2) for k in (1, 2)}
        ratios["ray_2_over_ray_1"] = round(runs["ray_1"]["wall_s"] / runs["ray_2"]["wall_s"], 2)
        result = {"benchmark": "encode", "quick": a.quick, "machine": mach, "items": n, "model": MODEL,
                  "batch_size": a.batch_size, "runs": runs, "ratios": ratios, "loadavg_end": loadavg()}
        print()
        print(table(rows, ["impl", "actors", "threads", "items_per_s", "items_per_s_incl_load", "wall_s",
                           "peak_rss_gib", "max_abs_diff"]))
        print(f"\nRay start-up (once, not in the rows above): {startup:.1f} s; baseline model load {b['load_s']} s")
        print(f"ratios (items/s, ours / baseline): {ratios}")
        print(f"load average at the end: {result['loadavg_end']}")
        path = write_results(f"encode_{n}" if a.items else "encode_quick" if a.quick else "encode", result)
        print(f"wrote {path}")
        return result
    finally:
        try:
            import ray
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
