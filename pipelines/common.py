"""What every Ray job shares: starting/attaching Ray, logging, the job contract (skip when up to date,
leftovers of a killed run removed), the seeded training users, the Ray Train trainer. Where artifacts live
is allmrec.artifacts.RunFolder's business."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from allmrec.config import Config

log = logging.getLogger("allmrec")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            stream=sys.stderr)
    for noisy in ("ray.data", "ray.train", "ray.serve", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def actor_pool(size: int):
    """The Ray Data actor pool of our model-running jobs (encode, the Stage-1 item table, evaluate, score):
    `size` actors, each running its batches in the thread that built it.

    By default Ray Data calls an actor's `__call__` in a helper thread (to overlap batching with the UDF).
    torch's OpenMP kernels lose parallelism there: the same ranking took 0.67-0.71 s per user in a helper
    thread against 0.44 s in the main thread of one process, at the same CPU time (2 threads, SmolLM2 bf16),
    and evaluate's actor ranked at 0.64-0.91 s per user; in the actor's own thread 0.47 s
    (docs/benchmarks.md, "evaluate"). With one task at a time per actor nothing is lost by it."""
    import ray
    return ray.data.ActorPoolStrategy(size=size, enable_true_multi_threading=True)


def init_ray(cfg: Config):
    """Attach to `cfg.ray.address`, or start a local cluster.

    Locally the logical CPU count is oversubscribed (2x the cores) on purpose: an actor-pool stage holds
    its CPUs for its whole life, and with exactly as many logical CPUs as cores a second stage or a read
    task can wait forever for one (docs/guide.md, `ray.num_cpus`).
    """
    import ray

    if not ray.is_initialized():
        _start_or_attach(ray, cfg)
        from allmrec.procs import reclaim_sigterm
        reclaim_sigterm()  # SIGTERM unwinds the job (finally: Ray shut down), not an abort in Ray's C++ handler
    import ray.data  # noqa: F401  (configures Ray Data's loggers; quiet them afterwards)
    for noisy in ("ray.data", "ray.train", "ray.serve", "ray.tune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # per process, so applied on every call (also when the caller started Ray itself)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.ray.progress) and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    ctx.use_datasource_v2 = bool(cfg.ray.datasource_v2)  # see RayConfig.datasource_v2
    return ray


def _start_or_attach(ray, cfg: Config) -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # DeepSpeed JIT-compiles a CPU comm op once: keep it in a persistent cache, not /tmp
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")  # set under `ray job submit`
    if address:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API, which Ray Train's PlacementGroupCleaner polls: without it
        # the cleaner cannot work and logs a warning every few seconds (half the main job's log lines).
        kwargs["include_dashboard"] = True
        kwargs.update(_state_api_of_this_cluster())
        num_cpus = cfg.ray.num_cpus or 2 * (os.cpu_count() or 1)
        if cfg.ray.object_store_memory_gb:
            kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * (1 << 30))
        ray.init(num_cpus=num_cpus, **kwargs)


_API_ADDRESS_OURS: str | None = None  # RAY_API_SERVER_ADDRESS as this process last set it


def _state_api_of_this_cluster() -> dict:
    """ray.init arguments (a dashboard port chosen here) + RAY_API_SERVER_ADDRESS naming that dashboard.

    Why: Ray Train's helper actors (the controller's PlacementGroupCleaner) call the State API without
    an address, and Ray then looks for running clusters by their processes: with a second cluster on
    the machine (another user's, a test session's) it raises "Found multiple active Ray instances"
    inside the actor, and the driver prints that traceback on every training job. The State API
    client reads RAY_API_SERVER_ADDRESS first (ray.init does not read it), and the local cluster's
    workers inherit this process's environment, so setting it before ray.init points every worker at
    this cluster's dashboard. A value the user set is left alone; our own from an earlier cluster of
    this process is replaced."""
    global _API_ADDRESS_OURS
    current = os.environ.get("RAY_API_SERVER_ADDRESS")
    if current and current != _API_ADDRESS_OURS:
        return {}
    import socket
    with socket.socket() as s:  # a free port now; Ray's dashboard binds it a moment later
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _API_ADDRESS_OURS = os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"dashboard_port": port}


def quiet_worker_logs() -> None:
    """Inside Ray Train workers: keep our progress lines, drop Ray's per-report INFO chatter."""
    for noisy in ("ray.train", "ray.data", "ray.tune", "deepspeed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # Ray Train v2 logs "Reporting training result N: ..." per report on a logger named by file path
        from ray.train.v2._internal.execution import context as train_context
        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: only the noise differs
        pass


def cache_dir() -> Path:
    return Path(os.environ.get("ALLMREC_CACHE", Path.home() / ".cache" / "allmrec"))


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT-compiled CPU ops are kept: one folder per install (torch, DeepSpeed and their
    path). torch rebuilds an op whose build inputs changed, so two virtual environments sharing one folder
    would recompile it (~30-60 s on 2 cores) each time the other had used it."""
    import hashlib
    import importlib.metadata
    import importlib.util
    spec = importlib.util.find_spec("deepspeed")
    parts = [spec.origin if spec else "", importlib.metadata.version("torch") if spec else "", sys.version]
    return cache_dir() / "torch_extensions" / hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def clear_leftovers(out_dir: Path) -> list[Path]:
    """Remove what a killed run of the job writing `out_dir` left beside it: the temporary and replaced
    folders or files of `allmrec.io.atomic_dir` / `write_json_atomic` (`<name>.tmp-*`, `<name>.old-*`) and,
    inside it, hidden temporary files (`.<file>.tmp-*`, `.<part>.<id>.tmp`). Returns what was removed."""
    import re
    import shutil

    out_dir = Path(out_dir)
    gone: list[Path] = []
    pattern = re.compile(rf"^{re.escape(out_dir.name)}\.(tmp|old)-[0-9a-f]+$")
    candidates = list(out_dir.parent.iterdir()) if out_dir.parent.is_dir() else []
    candidates += [p for p in out_dir.iterdir() if p.name.startswith(".") and ".tmp" in p.name] \
        if out_dir.is_dir() else []
    for p in candidates:
        if p.parent == out_dir or pattern.match(p.name):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    if gone:
        log.info("removed %d leftover(s) of an interrupted run: %s", len(gone), ", ".join(p.name for p in gone))
    return gone


def up_to_date(job: str, out_dir: Path, fp: str, force: bool) -> bool:
    """The job contract's first step: clear an interrupted run's leftovers, then True (and a log line)
    when `out_dir` holds a finished output of the same fingerprint and `force` is not set."""
    from allmrec.io import is_complete
    clear_leftovers(out_dir)
    if not force and is_complete(out_dir, fp):
        log.info("%s: %s is up to date; use --force to redo", job, out_dir)
        return True
    return False


def training_users(cfg: Config, prep, max_users: int | None) -> set[int] | None:
    """The users a training job learns from (None: all): the few-shot K users when `cfg.fewshot` is set,
    then at most `max_users` of them, a seeded choice (the same users for every job of a run)."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    if cfg.fewshot is None:
        if max_users is None or max_users >= prep.n_train_users:
            return None
        return set(rng.choice(prep.n_train_users, max_users, replace=False).tolist())
    fs = prep.fewshot
    pool = np.sort(fs.loc[fs["k"] == cfg.fewshot, "user"].to_numpy())
    if len(pool) == 0:
        raise ValueError(f"fewshot={cfg.fewshot}: no such subset in {sorted(set(fs['k']))}; prepare with "
                         f"data.fewshot_k containing it")
    if max_users is not None and max_users < len(pool):
        pool = pool[rng.choice(len(pool), max_users, replace=False)]
    return set(pool.tolist())


def worker_threads(cfg: Config, num_workers: int, use_gpu: bool) -> int:
    """torch intra-op threads per training worker: `cfg.torch_threads`, else the cores shared evenly
    (oversubscribing a 2-core machine with 2 threads x 2 workers made steps several times slower)."""
    if cfg.torch_threads:
        return int(cfg.torch_threads)
    return 4 if use_gpu else max(1, (os.cpu_count() or 1) // max(1, num_workers))


def drop_unregistered_checkpoints(trial_dir: Path) -> list[str]:
    """Remove the checkpoint folders of a Ray Train run that its checkpoint manager never registered: what
    an attempt killed mid-checkpoint left (Ray resumes from the checkpoints its snapshot lists and never
    deletes the others). Without a snapshot no checkpoint was registered: all go. An unreadable snapshot
    keeps everything. Returns the names removed."""
    import json
    import shutil

    trial_dir = Path(trial_dir)
    if not trial_dir.is_dir():
        return []
    found = [p for p in trial_dir.iterdir() if p.is_dir() and p.name.startswith("checkpoint_")]
    snapshot = trial_dir / "checkpoint_manager_snapshot.json"
    listed: set[str] = set()
    if snapshot.exists():
        try:
            state = json.loads(snapshot.read_text())
        except (OSError, ValueError):
            return []

        def walk(x) -> None:  # every checkpoint_dir_name anywhere in the snapshot (kept, latest, pending)
            if isinstance(x, dict):
                for k, v in x.items():
                    listed.add(v) if k == "checkpoint_dir_name" and isinstance(v, str) else walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(state)
    gone = sorted(p.name for p in found if p.name not in listed)
    for name in gone:
        shutil.rmtree(trial_dir / name, ignore_errors=True)
    if gone:
        log.info("removed %d checkpoint folder(s) a killed Train attempt left in %s: %s", len(gone), trial_dir,
                 ", ".join(gone))
    return gone


def make_trainer(cfg: Config, run_name: str, train_func, loop_config: dict, datasets: dict, *,
                 num_workers: int, use_gpu: bool, max_failures: int, force: bool):
    """The TorchTrainer every training job uses: DDP over gloo (CPU) or NCCL (GPU), the "train" dataset
    split across workers (the others replicated), two checkpoints kept, resume on worker failure.

    `run_name` carries the job's fingerprint, so a changed config is a new run; `force` wipes the old
    run folder first, since Ray Train would otherwise resume the finished run and return its checkpoint.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from allmrec.artifacts import RunFolder
    from pipelines.tracking import settings as tracking_settings

    results = RunFolder(cfg).ray_results
    if force:
        import shutil
        shutil.rmtree(results / run_name, ignore_errors=True)
    else:  # a killed attempt's half-written checkpoint, outside the snapshot Ray resumes from
        drop_unregistered_checkpoints(results / run_name)
    return TorchTrainer(
        train_func,
        train_loop_config={**loop_config, "threads": worker_threads(cfg, num_workers, use_gpu),
                           "tracking": tracking_settings(cfg)},  # MLflow (pipelines/tracking.py), rank 0 logs
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": 1}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(name=run_name, storage_path=str(results),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
