"""The TALLRec baseline as a Ray Train + DeepSpeed ZeRO-3 job, and as an evaluation variant, on tiny data."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.ray

R = 4  # LoRA rank of these tests
# persistence threshold 0: even the tiny adapters are partitioned, so the export must gather them
DS = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _save_tiny_llama(folder: Path) -> Path:
    """conftest's tiny random Llama (a conftest module cannot be imported by name: several share it)."""
    spec = importlib.util.spec_from_file_location("_pipelines_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.save_tiny_llama(folder)


@pytest.fixture(scope="module")
def tallrec_run(tiny_cfg_factory, tmp_path_factory):
    """The tiny prepared data and TALLRec on the tiny Llama, 2 workers under ZeRO-3. TALLRec needs no CF
    model, Stage-1 or Stage-2 (so not `trained_tiny`); the loader reads a CF folder: an untrained one."""
    from allmrec.artifacts import RunFolder
    from allmrec.cf import build_cf_model
    from allmrec.data.load import Prepared
    from pipelines.tallrec import tallrec

    llm = _save_tiny_llama(tmp_path_factory.mktemp("tallrec_llm"))
    # epochs / max_users unset in tallrec: Stage-2's (2, 24) are used
    cfg = tiny_cfg_factory(f"stage2.llm={llm}", "stage2.max_users=24", "stage2.epochs=2", "tallrec.num_workers=2",
                           "tallrec.zero_stage=3", "tallrec.deepspeed_config=configs/deepspeed/zero3.json",
                           "tallrec.lr=0.005", f"tallrec.lora_r={R}", run="tallrec")
    rf = RunFolder(cfg)
    prep = Prepared(rf.data)
    build_cf_model(cfg.cf.model, prep.n_items, prep.n_train_users, vars(cfg.cf)).save(rf.cf_dir())
    return cfg, tallrec(cfg, ds_overrides=DS)


def test_job_trains_and_exports_the_gathered_adapters_only(tallrec_run):
    from safetensors.numpy import load_file
    cfg, out = tallrec_run
    m = json.loads((out / "manifest.json").read_text())
    assert m["job"] == "tallrec" and m["workers"] == 2 and m["zero_stage"] == 3 and m["max_users"] == 24
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[-1]["loss"] < hist[0]["loss"], hist
    assert all(h["users_per_s"] > 0 and h["s_per_step"] > 0 for h in hist)
    f = hist[-1]
    local = f["llm_params_local_per_rank"]
    assert len(local) == 2 and all(0 < n < f["llm_params_full"] for n in local)  # the LLM is partitioned
    assert (out / "loss.png").stat().st_size > 0
    lora = load_file(str(out / "lora.safetensors"))
    # tiny Llama: 2 layers x (q_proj, v_proj) x (A, B), every tensor whole (gathered, not a rank's slice)
    assert len(lora) == 8 and all(".lora_A." in k or ".lora_B." in k for k in lora), sorted(lora)
    assert sum(v.size for v in lora.values()) == f["lora_params"]
    for k, v in lora.items():
        assert v.dtype == np.float32
        assert (v.shape[0] == R) if ".lora_A." in k else (v.shape[1] == R), (k, v.shape)
        if ".lora_B." in k:
            assert np.abs(v).sum() > 0, k  # B starts at 0: non-zero means trained values came back


def test_up_to_date_output_is_not_retrained(tallrec_run, monkeypatch):
    import pipelines.tallrec as tr
    cfg, out = tallrec_run
    before = (out / "manifest.json").read_text()

    def boom(*a, **k):
        raise AssertionError("retrained an up-to-date TALLRec")
    monkeypatch.setattr(tr, "make_trainer", boom)
    assert tr.tallrec(cfg, ds_overrides=DS) == out
    assert (out / "manifest.json").read_text() == before
    from allmrec.config import config_from_dict
    changed = config_from_dict(cfg.to_dict() | {"tallrec": cfg.to_dict()["tallrec"] | {"lora_alpha": 4.0}})
    with pytest.raises(AssertionError, match="retrained"):  # a changed setting is a new fingerprint
        tr.tallrec(changed, ds_overrides=DS)


def test_load_recommender_tallrec_ranks_with_the_adapters(tallrec_run):
    from allmrec.artifacts import load_recommender
    from allmrec.recommender import Example, candidate_order
    cfg, _ = tallrec_run
    rec, _, prep = load_recommender(cfg, "tallrec")
    base, _, _ = load_recommender(cfg, "llm_only")
    assert rec.projector is None and rec.item_vectors is None and not rec.use_user_token
    assert any(".lora_A." in n for n, _ in rec.llm.named_parameters())
    test = prep.candidates("test").head(3)
    exs = [Example(None, h, candidate_order([int(t), *map(int, n)], cfg.seed, user=int(u)), int(t))
           for u, h, t, n in zip(test["user"], test["history"], test["target"], test["negatives"])]
    s, s0 = rec.rank(exs), base.rank(exs)
    assert s.shape == (3, cfg.data.n_negatives + 1) and np.isfinite(s).all()
    assert not np.allclose(s, s0, atol=1e-4)  # the fine-tuned LLM scores differently from LLM-Only


def test_tallrec_in_the_cf_order_is_tied_to_it(tallrec_run, tmp_path):
    """stage2.order_baselines: TALLRec trains on the LLM-Only prompt with the candidates in the CF model's
    order (x_u sorts them, the LLM never sees it), records the order and the CF weights, and its adapters
    are refused for the seeded order."""
    from allmrec.artifacts import RunFolder
    from allmrec.config import config_from_dict
    from pipelines.tallrec import tallrec
    cfg = config_from_dict(tallrec_run[0].to_dict())
    run = tmp_path / "cf-order"  # the fixture's data and CF model; its own adapters
    run.mkdir()
    for part in ("data", "cf"):
        (run / part).symlink_to(Path(cfg.run_dir) / part)
    cfg.run_dir, cfg.stage2.candidate_order, cfg.stage2.order_baselines = str(run), "cf", True
    cfg.tallrec.num_workers, cfg.tallrec.zero_stage, cfg.tallrec.epochs = 1, 0, 1
    cfg.tallrec.deepspeed_config = "configs/deepspeed/zero0.json"
    cfg.stage2.examples_per_user = 2  # Stage-2's examples: TALLRec trains on the same ones
    out = tallrec(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["candidate_order"] == "cf" and m["cf_weights"]["sha256"] == RunFolder(cfg).cf_checksum()
    # one worker, batches of 4: one example for each of the 24 users would be at most 6 steps
    assert m["examples_per_user"] == 2 and m["final"]["steps"] > 24 // cfg.tallrec.batch_size, m
    rec = RunFolder(cfg).load_recommender("tallrec")[0]
    assert rec.candidate_order == "cf" and not rec.use_user_token
    cfg.stage2.order_baselines = False
    with pytest.raises(ValueError, match="trained on the cf candidate order"):
        RunFolder(cfg).load_recommender("tallrec")


def test_evaluate_scores_the_tallrec_variant(tallrec_run):
    from allmrec.config import config_from_dict
    from pipelines.evaluate import evaluate
    cfg = config_from_dict(tallrec_run[0].to_dict())
    cfg.eval.max_users, cfg.eval.batch_size, cfg.eval.variants = 4, 4, ["tallrec"]
    rep = json.loads((evaluate(cfg) / "report.json").read_text())
    o = rep["metrics"]["tallrec"]["overall"]
    assert o["n"] == 4 and 0 <= o["hit@1"] <= o["hit@10"] <= 1
