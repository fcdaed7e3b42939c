"""Shared fixtures: the real data in ../shared/data (skip when absent) and one Ray cluster per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()

os.environ.setdefault("ALLMREC_CACHE", str(Path.home() / ".cache" / "allmrec"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster for the whole test session (starting one costs 5-9 s)."""
    ray = pytest.importorskip("ray")
    from allmrec.config import Config
    from pipelines.common import init_ray

    cfg = Config()
    cfg.ray.num_cpus = 4
    cfg.ray.progress = False
    init_ray(cfg)
    yield ray
    try:
        from ray import serve
        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
