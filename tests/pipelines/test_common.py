"""pipelines.common helpers and the torch-free row builders (one test uses the session's Ray cluster)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from allmrec.config import ConfigError, load_config
from pipelines.common import training_users, worker_threads


def _prep(n: int = 50) -> SimpleNamespace:
    # nested few-shot subsets as prepare writes them: every user of K=4 is also in K=8
    fs = pd.DataFrame({"k": [4] * 4 + [8] * 8, "user": [1, 7, 20, 33] + [1, 3, 7, 11, 20, 33, 40, 41]})
    return SimpleNamespace(n_train_users=n, fewshot=fs)


def test_training_users_all_subset_and_fewshot():
    cfg = load_config(None, ["data.fewshot_k=[4,8]"])
    prep = _prep()
    assert training_users(cfg, prep, None) is None and training_users(cfg, prep, 50) is None
    sub = training_users(cfg, prep, 10)
    assert len(sub) == 10 and sub <= set(range(50)) and sub == training_users(cfg, prep, 10)  # seeded
    cfg.fewshot = 8
    assert training_users(cfg, prep, None) == {1, 3, 7, 11, 20, 33, 40, 41}
    few = training_users(cfg, prep, 3)
    assert len(few) == 3 and few <= {1, 3, 7, 11, 20, 33, 40, 41}
    cfg.fewshot = 4
    assert training_users(cfg, prep, None) == {1, 7, 20, 33}


def test_fewshot_must_be_a_prepared_subset():
    with pytest.raises(ConfigError, match="fewshot must be one of"):
        load_config(None, ["fewshot=100"])  # defaults prepare K = 128, 256
    cfg = load_config(None, ["fewshot=128"])
    with pytest.raises(ValueError, match="no such subset"):
        training_users(cfg, _prep(), None)  # the prepared data has no K=128 rows


def test_worker_threads():
    cfg = load_config(None, [])
    assert worker_threads(cfg, 2, use_gpu=False) >= 1
    cfg.torch_threads = 3
    assert worker_threads(cfg, 2, use_gpu=False) == 3


def test_row_builders_import_without_torch():
    """Ray Data task workers unpickle the row builders by importing pipelines.rows: torch must stay out
    of it (each fresh worker would pay its imports: see pipelines/rows.py)."""
    import subprocess
    import sys
    code = "import sys, pipelines.rows; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "False"


def test_init_ray_picks_the_parquet_reader_from_the_config(ray_session):
    import ray.data

    from allmrec.config import Config
    from pipelines.common import init_ray
    ctx = ray.data.DataContext.get_current()
    assert ctx.use_datasource_v2 is False  # the session's cluster was started with the default config
    cfg = Config()
    cfg.ray.datasource_v2 = True
    try:
        init_ray(cfg)  # attached already: the reader choice is still applied
        assert ctx.use_datasource_v2 is True
    finally:
        init_ray(Config())
    assert ctx.use_datasource_v2 is False
