"""Benchmark: kill one Ray Train worker during Stage-2 and check that the job resumes and ends the same.

    python -m bench.kill_worker --config configs/ml100k.yaml [--source runs/ml100k] [key=value ...]

Three run folders under --work (default /tmp/killbench), each a copy of the source run's data, encode,
cf and stage1 outputs. In each, `allmrec stage2` (pipelines.cli, a child process under `nice -n 19`)
trains the Stage-2 projectors with the small default budget below (ZeRO-3 over 2 Ray Train workers, the
main job's path) on the same config:
1. CLEAN and CLEAN_REPEAT (skip with --no-repeat): uninterrupted; the two together give the run-to-run
   noise floor the killed run is judged against;
2. KILLED: once the Ray Train storage (<run>/ray_results/stage2-*/checkpoint_manager_snapshot.json)
   lists the checkpoint of epoch --kill-after-epoch (and --kill-delay seconds later, so the kill lands
   inside the next epoch's steps), SIGKILL exactly one `ray::RayTrainWorker` process of THIS job (a
   descendant of the child: other Ray clusters on the machine are never touched). FailureConfig must
   restart the worker group, which restores the last checkpoint, and the job must exit 0.
Then compare with CLEAN: per-epoch losses (stage2/metrics.json), the exported projector (max abs
difference), epochs_run, the fingerprint; and look for half-written artifacts: every output folder has a
readable manifest, no `<name>.tmp-*` / `<name>.old-*` folder (allmrec.io.atomic_dir) is left, every Ray
Train checkpoint folder is registered in the snapshot and complete. The child's TMPDIR is a folder of its
own, so temporary folders nobody deleted show up there (reported; they are not artifacts): `tmp*` ones
would be a killed worker's checkpoint staging folder; `allmrec-*` ones are the CF-model copies
pipelines.stage1 made in the driver and in every worker before it switched to a TemporaryDirectory.
Recovery = kill -> first checkpoint reported after it (the re-run epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import loadavg, machine, table, write_results

REPO = Path(__file__).resolve().parents[1]
PARTS = ("data", "encode", "cf", "stage1")  # copied from the source run; stage2 is what we train
DEFAULTS = ["stage2.max_users=24", "stage2.epochs=3", "stage2.num_workers=2", "stage2.max_title_tokens=8",
            "ray.progress=false"]
ATOMIC_LEFTOVER = re.compile(r"\.(tmp|old)-[0-9a-f]{8}$")  # allmrec.io.atomic_dir's temporary names
SNAPSHOT = "checkpoint_manager_snapshot.json"
# Under `nice -n 19` on a saturated machine Ray's own daemons starve: a first attempt (load 20-600) lost
# its node when the GCS's health checks of the raylet timed out (5 x 10 s), which ended the job before
# any kill. More patient health checks keep a starved cluster alive; they play no part in noticing the
# killed worker (the raylet sees its process exit at once, Ray Train's poll of the actor fails).
RAY_PATIENCE = {"RAY_health_check_timeout_ms": "60000", "RAY_health_check_failure_threshold": "30",
                "RAY_gcs_rpc_server_reconnect_timeout_s": "900",
                "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900"}  # (re)starting the group, default 60 s


def merge_overrides(defaults: list[str], user: list[str]) -> list[str]:
    """`key=value` lists, the user's value winning for a key given in both."""
    out: dict[str, str] = {}
    for kv in [*defaults, *user]:
        if "=" not in kv:
            raise ValueError(f"override {kv!r} is not key=value")
        out[kv.split("=", 1)[0]] = kv
    return list(out.values())


def make_run_dir(source: Path, dest: Path) -> None:
    for part in PARTS:
        if not (source / part / "manifest.json").is_file():
            raise FileNotFoundError(f"{source / part} has no manifest.json: --source must be a trained run folder")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for part in PARTS:
        shutil.copytree(source / part, dest / part)


# ----------------------------------------------------------------------------- watching the child

def reports(run_dir: Path) -> list[dict[str, Any]]:
    """Checkpoints Ray Train has registered so far (the snapshot keeps only the last num_to_keep)."""
    out = []
    for snap in (run_dir / "ray_results").glob(f"stage2-*/{SNAPSHOT}"):
        try:
            d = json.loads(snap.read_text())
        except (OSError, json.JSONDecodeError):  # being rewritten right now: read it next time
            continue
        for r in d.get("checkpoint_results", []):
            out.append({"dir": r["checkpoint_dir_name"], "epoch": r.get("metrics", {}).get("epoch"),
                        "loss": r.get("metrics", {}).get("loss")})
    return out


def train_workers(root: psutil.Process) -> list[psutil.Process]:
    """This job's `ray::RayTrainWorker` processes: descendants of the child (its local Ray cluster)."""
    out = []
    try:
        kids = root.children(recursive=True)
    except psutil.Error:
        return out
    for p in kids:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        # a process the worker forks (a compiler, a helper) shows the same title until it execs: only
        # the raylet's direct children are the actor processes themselves
        if cmd and cmd[0].startswith("ray::RayTrainWorker") and _safe_name(p.parent()) == "raylet":
            out.append(p)
    return out


def _safe_name(p: psutil.Process | None) -> str:
    try:
        return p.name() if p is not None else ""
    except psutil.Error:
        return ""


def kill_tree(proc: subprocess.Popen) -> None:
    """On timeout: SIGKILL the child and every process under it, each by its pid."""
    try:
        root = psutil.Process(proc.pid)
        procs = [*root.children(recursive=True), root]
    except psutil.Error:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass


def run_stage2(name: str, run_dir: Path, config: str, overrides: list[str], *, kill_after: int | None,
               kill_delay: float, timeout: float, poll: float = 0.25) -> dict[str, Any]:
    """`nice -n 19 python -m pipelines.cli stage2 ...` in `run_dir`; with `kill_after`, SIGKILL one of its
    Ray Train workers once the checkpoint of that epoch is registered. Returns what was observed."""
    tmp = run_dir.parent / f"{run_dir.name}-tmpdir"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # TMPDIR: the workers' tempfile folders land here; RAY_TMPDIR keeps Ray's own session folder in /tmp/ray
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": "/tmp", "PYTHONUNBUFFERED": "1", **RAY_PATIENCE}
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pipelines.cli", "stage2", "--config", config,
           f"run_dir={run_dir}", *overrides]
    log_path = run_dir.parent / f"{name}.log"
    seen_reports: dict[str, dict[str, Any]] = {}  # checkpoint dir -> {epoch, loss, t}
    seen_workers: dict[int, float] = {}  # pid -> first seen (s since start)
    kill: dict[str, Any] | None = None
    ready_at: float | None = None
    load0 = loadavg()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        rc: int | str | None = None
        while rc is None:
            now = time.perf_counter() - t0
            for r in reports(run_dir):
                seen_reports.setdefault(r["dir"], {**r, "t": round(now, 2)})
            workers = train_workers(root)
            for p in workers:
                seen_workers.setdefault(p.pid, round(now, 2))
            if kill_after is not None and kill is None:
                if ready_at is None and any((r["epoch"] or 0) >= kill_after for r in seen_reports.values()):
                    ready_at = now
                if ready_at is not None and now - ready_at >= kill_delay and workers:
                    victim = sorted(workers, key=lambda p: p.pid)[-1]  # exactly one
                    try:
                        vcmd = " ".join(victim.cmdline()).strip()
                        victim.send_signal(signal.SIGKILL)
                        kill = {"pid": victim.pid, "cmdline": vcmd, "t": round(time.perf_counter() - t0, 2),
                                "workers_alive": sorted(p.pid for p in workers),
                                "after_epoch_reported": max(r["epoch"] or 0 for r in seen_reports.values())}
                        print(f"  [{name}] SIGKILL RayTrainWorker pid {victim.pid} at {kill['t']} s "
                              f"(epoch {kill['after_epoch_reported']} reported)", flush=True)
                    except psutil.NoSuchProcess:
                        pass  # it ended by itself between listing and kill: pick again next poll
            if now > timeout:
                kill_tree(proc)
                proc.wait()
                rc = "timeout"
                break
            rc = proc.poll()
            if rc is None:
                time.sleep(poll)
    wall = time.perf_counter() - t0
    for r in reports(run_dir):  # the last report may have landed between the final poll and the exit
        seen_reports.setdefault(r["dir"], {**r, "t": round(wall, 2)})
    timeline = sorted(seen_reports.values(), key=lambda r: r["t"])
    out: dict[str, Any] = {"rc": rc, "wall_s": round(wall, 1), "log": str(log_path), "cmd": " ".join(cmd),
                           "reports": timeline, "report_epochs": [r["epoch"] for r in timeline],
                           "train_worker_pids": seen_workers, "loadavg_start": load0, "loadavg_end": loadavg(),
                           "kill": kill}
    if kill is not None:
        after = [r for r in timeline if r["t"] > kill["t"]]
        new = [t for pid, t in seen_workers.items() if t > kill["t"]]
        out["recovery_s"] = round(after[0]["t"] - kill["t"], 1) if after else None
        out["recovered_epoch"] = after[0]["epoch"] if after else None
        out["new_workers_after_s"] = round(min(new) - kill["t"], 1) if new else None
        out["new_worker_pids"] = sorted(pid for pid, t in seen_workers.items() if t > kill["t"])
    text = log_path.read_text(errors="replace")
    out["log_failure_lines"] = [ln[:300] for ln in text.splitlines() if re.search(
        r"FailurePolicy|ActorDiedError:|Started training worker group|Error in training function|worker died",
        ln, re.I)][:20]
    out["log_tail"] = text[-2000:]
    out["tmpdir_leftovers"] = sorted(p.name for p in tmp.iterdir() if p.name != "ray")
    return out


# ----------------------------------------------------------------------------- checking the outputs

def artifact_check(run_dir: Path) -> dict[str, Any]:
    """Half-written outputs: folders without a readable manifest, atomic_dir leftovers, Ray Train
    checkpoint folders the snapshot does not know or that miss a file."""
    from allmrec.io import read_manifest
    missing = [p.name for p in sorted(run_dir.iterdir())
               if p.is_dir() and p.name in (*PARTS, "stage2") and read_manifest(p) is None]
    if not (run_dir / "stage2").is_dir():
        missing.append("stage2 (absent)")
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ATOMIC_LEFTOVER.search(p.name)]
    bad_ckpts = []
    for trial in (run_dir / "ray_results").glob("stage2-*"):
        try:
            known = {r["checkpoint_dir_name"] for r in json.loads((trial / SNAPSHOT).read_text())["checkpoint_results"]}
        except (OSError, json.JSONDecodeError, KeyError):
            known = set()
        for c in trial.glob("checkpoint_*"):
            if not c.is_dir():  # checkpoint_manager_snapshot.json
                continue
            files = {p.name for p in c.iterdir()}
            if c.name not in known or not {"projector.safetensors", "history.json", "engine"} <= files:
                bad_ckpts.append(f"{c.name}: registered={c.name in known}, files={sorted(files)}")
    return {"dirs_without_manifest": missing, "atomic_leftovers": leftovers, "bad_checkpoints": bad_ckpts,
            "ok": not (missing or leftovers or bad_ckpts)}


def stage2_outputs(run_dir: Path) -> dict[str, Any]:
    """epochs_run, train seconds and per-epoch losses of a finished run's stage2/ (empty if unreadable)."""
    from allmrec.io import read_manifest
    m = read_manifest(run_dir / "stage2") or {}
    try:
        hist = json.loads((run_dir / "stage2" / "metrics.json").read_text())["history"]
    except (OSError, json.JSONDecodeError, KeyError):
        return {}
    return {"epochs_run": m.get("epochs_run"), "fingerprint": m.get("fingerprint"),
            "train_seconds": m.get("train_seconds"), "history_epochs": [h["epoch"] for h in hist],
            "loss": [h["loss"] for h in hist], "epoch_seconds": [h["seconds"] for h in hist]}


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Run folder b against run folder a: per-epoch loss differences and the exported projector's."""
    import torch
    from safetensors.torch import load_file

    oa, ob = stage2_outputs(a), stage2_outputs(b)
    if not oa or not ob:
        return {"error": "a stage2 output is missing or unreadable"}
    out: dict[str, Any] = {"epochs_run": [oa["epochs_run"], ob["epochs_run"]],
                           "same_fingerprint": oa["fingerprint"] is not None and oa["fingerprint"] == ob["fingerprint"]}
    out["loss_abs_diff"] = [abs(x - y) for x, y in zip(oa["loss"], ob["loss"])]
    out["loss_max_abs_diff"] = max(out["loss_abs_diff"], default=None)
    pa_, pb = load_file(str(a / "stage2" / "projector.safetensors")), load_file(str(b / "stage2" / "projector.safetensors"))
    out["projector_same_keys"] = sorted(pa_) == sorted(pb)
    diffs = {k: float((pa_[k].float() - pb[k].float()).abs().max()) for k in pa_ if k in pb}
    out["projector_max_abs_diff"] = max(diffs.values(), default=None)
    out["projector_max_abs_value"] = max(float(v.abs().max()) for v in pa_.values())
    out["projector_params"] = int(sum(v.numel() for v in pa_.values()))
    out["projector_bitwise_equal"] = out["projector_same_keys"] and all(torch.equal(pa_[k], pb[k]) for k in pa_)
    return out


# ----------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/ml100k.yaml")
    ap.add_argument("--source", default="runs/ml100k", help="trained run folder whose data/encode/cf/stage1 are copied")
    ap.add_argument("--work", default="/tmp/killbench", help="where the clean/ and killed/ run folders go")
    ap.add_argument("--kill-after-epoch", type=int, default=1, help="kill once this epoch's checkpoint is reported")
    ap.add_argument("--kill-delay", type=float, default=5.0, help="seconds after that report (lands mid-epoch)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per run, seconds")
    ap.add_argument("--name", default="kill_worker", help="result name under bench/out/")
    ap.add_argument("--no-repeat", dest="repeat", action="store_false",
                    help="skip the second uninterrupted run (the run-to-run noise floor)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (after the small defaults)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    from allmrec.config import load_config
    overrides = merge_overrides(DEFAULTS, args.overrides)
    cfg = load_config(args.config, overrides)
    if cfg.stage2.num_workers < 2:
        raise ValueError("stage2.num_workers must be >= 2: the job must survive losing one of several workers")
    if not 1 <= args.kill_after_epoch < cfg.stage2.epochs:
        raise ValueError(f"--kill-after-epoch must be in [1, stage2.epochs={cfg.stage2.epochs}): a later epoch "
                         "must still be running when the worker is killed")
    source, work = Path(args.source).resolve(), Path(args.work).resolve()
    res: dict[str, Any] = {"benchmark": "kill_worker", "machine": machine(), "config": args.config,
                           "source": str(source), "overrides": overrides,
                           "settings": {"max_users": cfg.stage2.max_users, "epochs": cfg.stage2.epochs,
                                        "num_workers": cfg.stage2.num_workers, "zero_stage": cfg.stage2.zero_stage,
                                        "batch_size": cfg.stage2.batch_size, "max_failures": cfg.cf.max_failures,
                                        "kill_after_epoch": args.kill_after_epoch, "kill_delay_s": args.kill_delay,
                                        "nice": 19},
                           "runs": {}}
    plan = [("clean", None)] + ([("clean_repeat", None)] if args.repeat else []) + \
        [("killed", args.kill_after_epoch)]
    for name, kill_after in plan:
        run_dir = work / name
        make_run_dir(source, run_dir)
        print(f"[kill_worker] {name}: stage2 in {run_dir} (load {loadavg()})", flush=True)
        r = run_stage2(name, run_dir, args.config, overrides, kill_after=kill_after, kill_delay=args.kill_delay,
                       timeout=args.timeout)
        r["artifacts"] = artifact_check(run_dir)
        r["stage2"] = stage2_outputs(run_dir)
        res["runs"][name] = r
        print(f"  rc {r['rc']}, {r['wall_s']} s, reports at epochs {r['report_epochs']}, "
              f"artifacts ok {r['artifacts']['ok']}", flush=True)
        if r["rc"] != 0:
            print(r["log_tail"], flush=True)
    runs = res["runs"]
    # killed vs clean is the test; clean_repeat vs clean is the noise floor (two uninterrupted runs)
    res["compare"] = {f"{b} vs clean": compare(work / "clean", work / b) for b in runs
                      if b != "clean" and runs["clean"]["rc"] == 0 and runs[b]["rc"] == 0}
    killed, cmp = runs["killed"], res["compare"].get("killed vs clean", {})
    res["passed"] = bool(all(r["rc"] == 0 and r["artifacts"]["ok"] for r in runs.values())
                         and killed["kill"] is not None and killed.get("recovery_s") is not None
                         and "error" not in cmp and len(set(cmp["epochs_run"])) == 1 and cmp["same_fingerprint"])

    rows = []
    for name, r in runs.items():
        k, o, left = r["kill"] or {}, r["stage2"], r["tmpdir_leftovers"]
        rows.append({"run": name, "rc": r["rc"], "wall s": r["wall_s"], "train s": o.get("train_seconds"),
                     "reports (epochs)": ",".join(map(str, r["report_epochs"])), "epochs_run": o.get("epochs_run"),
                     "loss per epoch": " / ".join(f"{x:.5f}" for x in o.get("loss", [])),
                     "killed pid": k.get("pid"), "kill at s": k.get("t"),
                     "new workers after s": r.get("new_workers_after_s"), "recovery s": r.get("recovery_s"),
                     "artifacts ok": "yes" if r["artifacts"]["ok"] else "NO",
                     "TMPDIR left: tmp* / allmrec-*": f"{sum(not n.startswith('allmrec-') for n in left)} / "
                                                       f"{sum(n.startswith('allmrec-') for n in left)}",
                     "load 1m": r["loadavg_start"][0]})
    cols = ["run", "rc", "wall s", "train s", "reports (epochs)", "epochs_run", "loss per epoch", "killed pid",
            "kill at s", "new workers after s", "recovery s", "artifacts ok", "TMPDIR left: tmp* / allmrec-*",
            "load 1m"]
    crow = [{"comparison": name, "epochs_run": "/".join(map(str, c.get("epochs_run", []))),
             "same fingerprint": {True: "yes", False: "NO"}.get(c.get("same_fingerprint")),
             "|loss diff| per epoch": " / ".join(f"{x:.2e}" for x in c.get("loss_abs_diff", [])),
             "projector max |diff|": c.get("projector_max_abs_diff"),
             "projector max |weight|": c.get("projector_max_abs_value"),
             "bitwise equal": {True: "yes", False: "no"}.get(c.get("projector_bitwise_equal"))}
            for name, c in res["compare"].items()]
    ccols = ["comparison", "epochs_run", "same fingerprint", "|loss diff| per epoch", "projector max |diff|",
             "projector max |weight|", "bitwise equal"]
    res["table"] = table(rows, cols) + "\n\n" + table(crow, ccols)
    res["machine_end"] = {"loadavg_1_5_15": loadavg()}
    print(res["table"])
    print(f"passed: {res['passed']}")
    path = write_results(args.name, res)
    print(f"-> {path}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main().get("passed") else 1)
