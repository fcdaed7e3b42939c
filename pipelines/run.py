"""`allmrec run`: the main job, every step in order, each skipped when its output is up to date.

prepare -> encode -> train-cf -> stage1 -> stage2 -> evaluate -> score, then (unless --no-serve) the
service is started and asked for one real recommendation.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from allmrec.config import Config

log = logging.getLogger("allmrec.run")


def steps():
    """(name, run(cfg, force) -> path, summary(path) -> str) in pipeline order."""
    from pipelines import encode, evaluate, prepare, score, stage1, stage2, train_cf
    return [("prepare", prepare.prepare, prepare.summary),
            ("encode", encode.encode, encode.summary),
            ("train-cf", train_cf.train_cf, train_cf.summary),
            ("stage1", stage1.stage1, stage1.summary),
            ("stage2", stage2.stage2, stage2.summary),
            ("evaluate", evaluate.evaluate, evaluate.summary),
            ("score", score.score, score.summary)]


def run(cfg: Config, force: bool = False, serve: bool = True) -> dict[str, str]:
    results: dict[str, str] = {}
    all_steps = steps()
    t_all = time.perf_counter()
    for i, (name, fn, summarize) in enumerate(all_steps, 1):
        t0 = time.perf_counter()
        print(f"\n=== [{i}/{len(all_steps)}] {name} ===", flush=True)
        path = fn(cfg, force=force)
        results[name] = str(path)
        print(summarize(Path(path)), flush=True)
        print(f"=== [{i}/{len(all_steps)}] {name} finished in {time.perf_counter() - t0:.1f} s ===", flush=True)
    print(f"\nall steps done in {time.perf_counter() - t_all:.1f} s; report: {results['evaluate']}/report.md "
          f"(plots: {results['evaluate']}/hit1.png, {results['stage2']}/loss.png)", flush=True)
    if serve:
        _serve_demo(cfg)
    else:
        print(f"start the service with: allmrec serve --config <this config> run_dir={cfg.run_dir}")
    return results


def _serve_demo(cfg: Config) -> None:
    """Start the Ray Serve application, make one real request over HTTP, print the answer, stop.

    The service runs in its own process (`python -m serve`): pipelines/ never imports serve/. It attaches
    to this job's Ray cluster through RAY_ADDRESS.
    """
    import json
    import os
    import signal
    import subprocess
    import sys

    import httpx
    import ray

    from allmrec.artifacts import RunFolder

    rf = RunFolder(cfg)
    cfg_path = rf.serve_config
    cfg.dump(cfg_path)
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--config", str(cfg_path)], env=env)
    url = f"http://127.0.0.1:{cfg.serve.port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {proc.returncode}")
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise TimeoutError("the service did not come up within 10 minutes")
        prep = rf.prepared()
        user = int(prep.sequences["user"].iloc[0])
        body = {"user_id": user, "k": 5}
        r = httpx.post(f"{url}/v1/recommend", json=body, timeout=300)
        print(f"\nPOST {url}/v1/recommend {json.dumps(body)} -> {r.status_code}")
        print(json.dumps(r.json(), indent=2)[:3000])
    finally:
        proc.send_signal(signal.SIGINT)  # the service shuts Serve down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\nserve it yourself: allmrec serve --config {cfg_path}  (OpenAPI docs at {url}/docs)")
