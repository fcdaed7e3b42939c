"""Cross-domain evaluation: a run trained on one dataset scores another prepared dataset."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.pipelines.conftest import write_markov_seq_txt


@pytest.fixture(scope="module")
def cross_cfg(trained_tiny, tiny_cfg_factory, tmp_path_factory):
    src = trained_tiny[0]
    other = write_markov_seq_txt(tmp_path_factory.mktemp("other"), n_users=60, n_items=40, seed=7)
    return tiny_cfg_factory(f"data.path={other}", f"stage2.llm={src.stage2.llm}", f"eval.source_run={src.run_dir}",
                            "eval.max_users=8", "eval.batch_size=4",
                            "eval.variants=[most_popular,llm_only,allmrec]", run="cross")


def test_cross_domain_scores_the_target_items_with_the_source_models(cross_cfg, trained_tiny):
    from allmrec.artifacts import read_item_table
    from allmrec.data.load import Prepared
    from pipelines.evaluate import evaluate

    out = evaluate(cross_cfg)
    assert out.name == f"report-from-{Path(trained_tiny[0].run_dir).name}"
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["source_run"] == str(Path(trained_tiny[0].run_dir).resolve())
    assert set(rep["metrics"]) == {"most_popular", "llm_only", "allmrec"}
    for scen in rep["metrics"].values():
        assert scen["overall"]["n"] == 8 and 0 <= scen["overall"]["hit@1"] <= 1
    assert "Cross-domain" in (out / "report.md").read_text()

    # the target's items, embedded by the source's Stage-1 text side: e_i = q_i, one row per target item
    table = next((Path(cross_cfg.run_dir) / "cross").glob("*/joint_emb.parquet"))
    e, q = read_item_table(table)
    assert e.shape[0] == Prepared(Path(cross_cfg.run_dir) / "data").n_items + 1
    np.testing.assert_array_equal(e, q)
    assert np.isfinite(q).all() and q[1:].std(axis=0).min() > 0

    # the source's projectors read the target's item vectors: A-LLMRec's scores are not the text-only ones
    from allmrec.artifacts import load_recommender, user_reps
    from allmrec.recommender import Example
    res = pd.read_parquet(out / "results.parquet")
    assert (res[res.scenario == "overall"].groupby("variant").size() == 8).all()
    scores = {}
    for v in ("allmrec", "llm_only"):
        rec, cf, prep = load_recommender(cross_cfg, v, source=cross_cfg.eval.source_run, item_table=table)
        x_u = user_reps(cf, [np.zeros(0, dtype=np.int64)], None)[0] if rec.use_user_token else None
        scores[v] = rec.rank([Example(x_u, np.array([1, 2, 3]), [4, 5, 6, 7], 4)])[0]
    assert np.isfinite(scores["allmrec"]).all()
    assert not np.allclose(scores["allmrec"], scores["llm_only"])


def test_cross_domain_refuses_cf_models_and_missing_sources(cross_cfg, tmp_path):
    from allmrec.config import config_from_dict
    from pipelines.evaluate import evaluate

    cfg = config_from_dict(cross_cfg.to_dict())
    cfg.eval.variants = ["sasrec"]
    with pytest.raises(ValueError, match="cannot score another domain"):
        evaluate(cfg)
    cfg.eval.variants = ["most_popular"]  # a CF variant is refused first, before the source is looked at
    cfg.eval.source_run = str(tmp_path / "nothing-trained-here")
    with pytest.raises(FileNotFoundError, match="no trained cf and stage1"):
        evaluate(cfg)
