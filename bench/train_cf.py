"""Benchmark: SASRec training with Ray Train (1 and 2 workers) vs a plain single-process loop.

    python -m bench.train_cf            # 6 epochs each
    python -m bench.train_cf --quick    # 3 epochs each

All on the prepared amazon-scientific set, same config (cf.* defaults: hidden 50, max_len 50, 2 blocks,
batch 128), same run. Two numbers per implementation, kept apart:
- steady-state training examples/s: the mean over epochs 2..E of the per-epoch figure (Ray: `history`
  of metrics.json, measured by rank 0 around its training loop, examples of all ranks; baseline: the
  same quantity around `allmrec.cf.trainer.train_epoch`), i.e. without validation, start-up or epoch 1;
- total wall time of the whole call, start-up included (Ray: the `train_cf` call with Ray Train's
  worker group, DDP set-up and dataset shards, per-epoch validation, test evaluation and writing;
  baseline: loading the data, building batches and model, the epochs and per-epoch validation).
The local Ray cluster is started once before the Ray runs; its start-up is reported on its own.
The baseline runs twice: with torch threads = cores (what the 1-worker Ray run gets) and with 1 thread
(what each of the 2 workers gets on 2 cores), so the effect of threads is not mistaken for Ray's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import PeakRSS, loadavg, machine, prepared_scientific, table, write_results


def baseline(cfg, epochs: int, threads: int) -> dict:
    """The plain loop: TrainBatches + train_epoch, validation every epoch like the Ray job."""
    import torch

    from allmrec.cf import build_cf_model
    from allmrec.cf.data import TrainBatches
    from allmrec.cf.trainer import evaluate_candidates, train_epoch
    from allmrec.data.load import Prepared
    from allmrec.artifacts import RunFolder
    from allmrec.metrics import summarize

    c = cfg.cf
    t_start = time.perf_counter()
    torch.set_num_threads(threads)
    prep = Prepared(RunFolder(cfg).data)
    seqs = prep.sequences
    full = [np.asarray(s, dtype=np.int64) for s in seqs["seq"]]
    batches = TrainBatches([s[:-2] for s in full], seqs["user"].to_numpy(), c.max_len, prep.n_items, c.batch_size,
                           seed=cfg.seed, histories=full)
    valid = prep.candidates("valid")
    v_hist = [np.asarray(h) for h in valid["history"]]
    v_cands = np.array([[t, *n] for t, n in zip(valid["target"], valid["negatives"])], dtype=np.int64)
    torch.manual_seed(cfg.seed)
    model = build_cf_model(c.model, prep.n_items, prep.n_train_users, vars(c))
    opt = torch.optim.Adam(model.parameters(), lr=c.lr, betas=(0.9, 0.98), weight_decay=c.weight_decay)
    history = []
    for epoch in range(1, epochs + 1):
        batches.set_epoch(epoch)
        t0 = time.perf_counter()
        loss = train_epoch(model, batches, opt)
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch, "loss": loss, "train_s": round(dt, 3),
               "examples_per_s": round(batches.n_examples / dt, 1)}
        rec.update({f"valid_{k}": v for k, v in summarize(
            evaluate_candidates(model, v_hist, valid["user"].to_numpy(), v_cands)).items()})
        history.append(rec)
    return {"history": history, "wall_s": round(time.perf_counter() - t_start, 2), "examples": batches.n_examples,
            "threads": torch.get_num_threads()}


def _ray_run(cfg, workers: int, epochs: int, attempts: int = 2) -> dict:
    """One `train_cf` call with `workers` Ray Train workers; retried once when it fails (on a shared
    machine Ray's node-wide memory monitor can kill our workers for other jobs' memory)."""
    from allmrec.artifacts import RunFolder
    from pipelines.train_cf import train_cf

    cfg.cf.num_workers = workers
    errors = []
    for _ in range(attempts):
        # Ray Train resumes a run of the same name from its last checkpoint (the name depends on the data
        # and cf config, not on num_workers), so without this the 2-worker call would restore the finished
        # 1-worker run and train 0 epochs, even with force=True
        shutil.rmtree(RunFolder(cfg).ray_results, ignore_errors=True)
        try:
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                out = train_cf(cfg, force=True)
                wall = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001  (recorded in the results, then retried)
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            print(f"{workers}-worker run failed: {errors[-1]}")
            time.sleep(30)
            continue
        met = json.loads((out / "metrics.json").read_text())
        if len(met["history"]) != epochs:
            raise RuntimeError(f"{workers}-worker run recorded {len(met['history'])} epochs, expected {epochs}")
        return {"wall_s": round(wall, 2), "fit_s": met["train_seconds"], "history": met["history"],
                "failed_attempts": errors, **mem.result(), "loadavg": loadavg()}
    return {"error": " | ".join(errors), "loadavg": loadavg()}


def _steady(history: list[dict]) -> float | None:
    xs = [h["examples_per_s"] for h in history[1:]]
    return round(float(np.mean(xs)), 1) if xs else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs instead of 6")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args(argv)
    epochs = a.epochs or (3 if a.quick else 6)
    if epochs < 2:
        raise ValueError("--epochs must be >= 2 (the first epoch is left out of examples/s)")
    mach = machine()
    print(f"machine: {mach['cpu_model']}, {mach['logical_cores']} cores, {mach['ram_gib']} GiB; "
          f"load average {mach['loadavg_1_5_15']}")
    work = Path(tempfile.mkdtemp(prefix="bench-train-cf-"))
    try:
        import ray

        from allmrec.artifacts import RunFolder
        from pipelines.common import init_ray, setup_logging

        setup_logging()
        cfg, prep_s = prepared_scientific(work / "run", f"cf.epochs={epochs}", "cf.patience=1000")
        ray.shutdown()  # the baseline runs alone
        m = RunFolder(cfg).require(RunFolder(cfg).data, "allmrec prepare")["counts"]
        print(f"data: prepared amazon-scientific ({prep_s:.0f} s to prepare, not timed): {m['users']:,} users, "
              f"{m['items']:,} items, {m['interactions']:,} interactions; {epochs} epochs each")

        runs: dict = {}
        # torch threads: all cores, as one Ray Train worker gets (cores // workers); and 1, as each of
        # 2 workers gets on 2 cores (on a loaded machine one 2-thread process can be far slower)
        cores = os.cpu_count() or 1
        for key, threads in (("baseline", cores), ("baseline_1thread", 1)):
            if key == "baseline_1thread" and cores == 1:
                continue
            with PeakRSS() as mem:
                runs[key] = baseline(cfg, epochs, threads) | {"loadavg": loadavg()}
            runs[key] |= mem.result()
        t0 = time.perf_counter()
        init_ray(cfg)
        runs["ray_startup_s"] = round(time.perf_counter() - t0, 2)
        for w in (1, 2):
            runs[f"ray_{w}"] = _ray_run(cfg, w, epochs)

        rows = []
        for key in ("baseline", "baseline_1thread", "ray_1", "ray_2"):
            r = runs.get(key)
            if r is None:
                continue
            ray_w = int(key[-1]) if key.startswith("ray") else None
            row = {"impl": "ours: Ray Train (DDP, gloo)" if ray_w else "baseline: train_epoch loop",
                   "workers": ray_w or 1, "threads": max(1, cores // ray_w) if ray_w else r["threads"]}
            if "error" in r:
                rows.append(row | {"note": f"failed: {r['error'][:80]}"})
                continue
            rows.append(row | {"examples_per_s": _steady(r["history"]),
                               "epoch1_examples_per_s": r["history"][0]["examples_per_s"], "fit_s": r.get("fit_s"),
                               "total_wall_s": r["wall_s"],
                               "valid_ndcg@10": round(r["history"][-1]["valid_ndcg@10"], 4),
                               "peak_rss_gib": r["peak_rss_gib"]})
        eps = {k: _steady(r["history"]) for k, r in runs.items() if isinstance(r, dict) and "history" in r}
        walls = {k: runs[k]["wall_s"] for k in eps}
        ratios = {}
        for w in (1, 2):
            for base in ("baseline", "baseline_1thread"):
                if f"ray_{w}" in eps and base in eps:
                    ratios[f"ray_{w}_examples_per_s_over_{base}"] = round(eps[f"ray_{w}"] / eps[base], 2)
            if f"ray_{w}" in eps:
                ratios[f"ray_{w}_total_wall_over_baseline"] = round(walls[f"ray_{w}"] / walls["baseline"], 2)
        if "ray_1" in eps and "ray_2" in eps:
            ratios["ray_2_over_ray_1_examples_per_s"] = round(eps["ray_2"] / eps["ray_1"], 2)
        result = {"benchmark": "train_cf", "quick": a.quick, "epochs": epochs, "machine": mach, "data_counts": m,
                  "cf": cfg.to_dict()["cf"], "runs": runs, "ratios": ratios, "loadavg_end": loadavg()}
        print()
        print(table(rows, ["impl", "workers", "threads", "examples_per_s", "epoch1_examples_per_s", "fit_s",
                           "total_wall_s", "valid_ndcg@10", "peak_rss_gib", "note"]))
        print(f"\nexamples_per_s: mean over epochs 2..{epochs} (training loop only); total_wall_s: whole call "
              f"(Ray: + Ray Train start-up, validation, test, writing). Ray cluster start-up once: "
              f"{runs['ray_startup_s']} s")
        print(f"ratios: {ratios}")
        print(f"load average at the end: {result['loadavg_end']}")
        name = f"train_cf_{epochs}ep" if a.epochs else "train_cf_quick" if a.quick else "train_cf"
        path = write_results(name, result)
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
