"""Helpers shared by bench/stage1.py, bench/stage2.py and bench/evaluate.py (bench/common.py has the rest).

- the prepared amazon-scientific run folder these benchmarks reuse (`/tmp/bench_sci`, made once);
- a load gate: the machine is shared, so a measurement waits while the 1-min load average is high;
- `linked_sci_run`: a throw-away run folder linking its data and CF model, for the job rows;
- `run_child`: every measured configuration runs in its own Python process, so its peak RSS is its own
  (a process's RSS never shrinks back after a big allocation) and no configuration warms another's
  caches. The child gets a JSON spec on its command line and writes a JSON result file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PeakRSS, loadavg

REPO = Path(__file__).resolve().parents[1]
SCI_RUN = Path(os.environ.get("BENCH_SCI_RUN", "/tmp/bench_sci"))


@contextlib.contextmanager
def linked_sci_run(prefix: str):
    """A throw-away run folder whose data/ and cf/ link to /tmp/bench_sci's (read only): where a job row
    of a benchmark writes its own outputs. Removed afterwards."""
    run = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        for part in ("data", "cf"):
            (run / part).symlink_to(SCI_RUN / part)
        yield run
    finally:
        shutil.rmtree(run, ignore_errors=True)


def sci_config(*overrides: str):
    from allmrec.config import load_config
    return load_config(REPO / "configs" / "scientific.yaml",
                       [f"run_dir={SCI_RUN}", "ray.progress=false", *overrides])


def ensure_scientific(train_cf: bool = True) -> dict[str, Any]:
    """Prepare /tmp/bench_sci (unless its data/manifest.json exists) and, with `train_cf`, a SASRec
    trained for 5 epochs (unless the run folder has one). Not timed. Returns what was done."""
    from allmrec.artifacts import RunFolder
    done: dict[str, Any] = {"run_dir": str(SCI_RUN)}
    cfg = sci_config()
    if not (SCI_RUN / "data" / "manifest.json").is_file():
        from pipelines.common import init_ray
        from pipelines.prepare import prepare
        t0 = time.perf_counter()
        init_ray(cfg)
        prepare(cfg)
        done["prepare_s"] = round(time.perf_counter() - t0, 1)
    if train_cf and RunFolder(cfg).cf_found() is None:
        from pipelines.common import init_ray
        from pipelines.train_cf import train_cf as _train_cf
        t0 = time.perf_counter()
        init_ray(cfg)
        _train_cf(sci_config("cf.epochs=5"))
        done["train_cf_s"] = round(time.perf_counter() - t0, 1)
    return done


def load_cf(cfg, prep):
    """(frozen CF model in eval mode, description). The trained SASRec of the run folder when there is
    one, else an untrained one (seeded): the speed of Stages 1-2 does not depend on its weights."""
    import torch

    from allmrec.artifacts import RunFolder
    from allmrec.cf import build_cf_model
    rf = RunFolder(cfg)
    cf_dir = rf.cf_found()
    if cf_dir is not None:
        model = rf.load_cf()
        meta = rf.cf_manifest()
        desc = f"trained {cfg.cf.model} from {cf_dir} ({meta.get('epochs_run', '?')} epochs)"
    else:
        torch.manual_seed(cfg.seed)
        model = build_cf_model(cfg.cf.model, prep.n_items, prep.n_train_users, vars(cfg.cf))
        desc = f"untrained {cfg.cf.model} (seed {cfg.seed})"
    model.eval()
    model.requires_grad_(False)
    return model, desc


def wait_for_load(max_load: float, budget: dict[str, float], poll: float = 30.0) -> dict[str, Any]:
    """Wait (polling every `poll` s) while the 1-min load average is above `max_load`, spending at most
    budget["left"] seconds in all (shared by the measurements of one benchmark run)."""
    first = loadavg()
    waited = 0.0
    while os.getloadavg()[0] > max_load and budget["left"] > 0:
        nap = min(poll, budget["left"])
        print(f"  load {os.getloadavg()[0]:.1f} > {max_load}: waiting {nap:.0f} s "
              f"({budget['left']:.0f} s of waiting left)", flush=True)
        time.sleep(nap)
        waited += nap
        budget["left"] -= nap
    return {"load_when_ready": first, "waited_s": round(waited), "load_at_start": loadavg()}


def run_child(module: str, spec: dict[str, Any], timeout: float = 900.0,
              include_ray: bool = False) -> dict[str, Any]:
    """Run `python -m <module> --child '<spec json>' --result <file>` and sample its peak RSS/PSS.

    Returns the child's JSON result plus `peak_rss_gib`, `peak_pss_gib`, `child_wall_s`, the load average
    at start and end. A failing child raises RuntimeError with the end of its stderr."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.log"
        cmd = [sys.executable, "-m", module, "--child", json.dumps(spec), "--result", str(result)]
        load0 = loadavg()
        t0 = time.perf_counter()
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=subprocess.STDOUT)
            with PeakRSS(root=proc.pid, include_ray=include_ray) as mem:
                try:
                    rc = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc = "timeout"
        wall = time.perf_counter() - t0
        if rc != 0 or not result.is_file():
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{module} child {spec} failed ({rc}):\n{tail}")
        out = json.loads(result.read_text())
    out.update(mem.result())
    out.update({"child_wall_s": round(wall, 1), "loadavg_start": load0, "loadavg_end": loadavg()})
    return out


def child_main(argv: list[str], run) -> bool:
    """In a benchmark module's main: if called as a child, run `run(spec)`, write its result, return True."""
    if "--child" not in argv:
        return False
    spec = json.loads(argv[argv.index("--child") + 1])
    path = Path(argv[argv.index("--result") + 1])
    path.write_text(json.dumps(run(spec), default=str))
    return True


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 2)
