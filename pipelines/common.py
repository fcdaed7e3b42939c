"""What every Ray job shares: starting/attaching Ray, run-folder layout, logging."""
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


def init_ray(cfg: Config):
    """Attach to `cfg.ray.address`, or start a local cluster.

    Locally the logical CPU count is oversubscribed (2x the cores) on purpose: an actor-pool stage holds
    its CPUs for its whole life, and with exactly as many logical CPUs as cores a second stage or a read
    task can wait forever for one (see docs/architecture.md).
    """
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # DeepSpeed JIT-compiles a CPU comm op once: keep it in a persistent cache, not /tmp
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))
    kwargs: dict = {"ignore_reinit_error": True, "include_dashboard": False, "log_to_driver": True}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")  # set under `ray job submit`
    if address:
        ray.init(address=address, **kwargs)
    else:
        num_cpus = cfg.ray.num_cpus or 2 * (os.cpu_count() or 1)
        if cfg.ray.object_store_memory_gb:
            kwargs["object_store_memory"] = int(cfg.ray.object_store_memory_gb * (1 << 30))
        ray.init(num_cpus=num_cpus, **kwargs)
    import ray.data  # noqa: F401  (configures Ray Data's loggers; quiet them afterwards)
    for noisy in ("ray.data", "ray.train", "ray.serve", "ray.tune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(cfg.ray.progress) and sys.stderr.isatty()
    ctx.print_on_execution_start = False
    return ray


def quiet_worker_logs() -> None:
    """Inside Ray Train workers: keep our progress lines, drop Ray's per-report INFO chatter."""
    for noisy in ("ray.train", "ray.data", "ray.tune", "deepspeed", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cache_dir() -> Path:
    return Path(os.environ.get("ALLMREC_CACHE", Path.home() / ".cache" / "allmrec"))


def run_path(cfg: Config, *parts: str) -> Path:
    return Path(cfg.run_dir).expanduser().resolve().joinpath(*parts)
