"""Starting and stopping the service from Python (`allmrec serve` and `python -m serve` call `start`)."""
from __future__ import annotations

import logging
import os
import time

from allmrec.config import Config

log = logging.getLogger("allmrec.serve")


def connect_ray(cfg: Config):
    """Attach to cfg.ray.address (or $RAY_ADDRESS), else start a local cluster sized by cfg.ray.num_cpus.

    Not pipelines.common.init_ray: serve/ never imports pipelines/, and allmrec/ (which both share)
    never imports Ray, so the service keeps this minimal start of its own. It reads the same config
    keys and applies the same local default (2 logical CPUs per core: replicas hold their CPUs for
    life, docs/guide.md `ray.num_cpus`); it needs none of init_ray's Ray Data / Train settings, and no
    dashboard (Serve does not poll the State API)."""
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"ignore_reinit_error": True, "include_dashboard": False}
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=cfg.ray.num_cpus or 2 * (os.cpu_count() or 1), **kwargs)
        from allmrec.procs import reclaim_sigterm
        reclaim_sigterm()  # SIGTERM stops the service cleanly, not an abort in Ray's C++ handler
    return ray


def start(cfg: Config, blocking: bool = False, variant: str | None = None, tuning=None) -> str:
    """Deploy the service for the trained run folder cfg.run_dir on cfg.serve.host:port and return its
    base URL once every replica has loaded its models. blocking: serve until Ctrl-C, then shut down."""
    from ray import serve

    from serve.app import APP_NAME, build_app

    connect_ray(cfg)
    app = build_app(cfg, variant, tuning)  # validates the config before anything starts
    host, port = cfg.serve.host, cfg.serve.port
    serve.start(http_options={"host": host, "port": port})
    t0 = time.perf_counter()
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    log.info("allmrec service up in %.1f s at %s (OpenAPI docs: %s/docs)", time.perf_counter() - t0, url, url)
    if blocking:
        print(f"serving at {url} (docs {url}/docs); Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            stop()
    return url


def stop() -> None:
    """Shut Serve down (all applications, proxies and the controller); idempotent."""
    import ray
    if not ray.is_initialized():
        return
    from ray import serve
    serve.shutdown()
