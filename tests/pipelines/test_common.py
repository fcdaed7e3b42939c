"""pipelines.common helpers that need no Ray cluster."""
from __future__ import annotations

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
