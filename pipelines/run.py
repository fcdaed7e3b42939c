"""`allmrec run`: the main job, every step in order, each skipped when its output is up to date.

prepare -> encode -> train-cf -> stage1 -> stage2 -> evaluate -> score (-> serve)
"""
from __future__ import annotations

import logging
import time

from allmrec.config import Config

log = logging.getLogger("allmrec.run")


def steps():
    """(name, run(cfg, force) -> path, summary(path) -> str) in pipeline order."""
    from pipelines import encode, prepare, train_cf
    out = [("prepare", prepare.prepare, prepare.summary),
           ("encode", encode.encode, encode.summary),
           ("train-cf", train_cf.train_cf, train_cf.summary)]
    return out


def run(cfg: Config, force: bool = False) -> dict[str, str]:
    results: dict[str, str] = {}
    all_steps = steps()
    for i, (name, fn, summarize) in enumerate(all_steps, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(all_steps)}] {name} ...", flush=True)
        path = fn(cfg, force=force)
        results[name] = str(path)
        print(summarize(path), flush=True)
        print(f"[{i}/{len(all_steps)}] {name} finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return results
