"""Stage-1 and Stage-2 as Ray Train + DeepSpeed jobs, evaluation and offline scoring, on tiny data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = pytest.mark.ray


def test_stage1_outputs_joint_embeddings_and_losses(trained_tiny):
    cfg, _ = trained_tiny
    from allmrec.artifacts import load_joint_embeddings, run_dir
    from allmrec.data.load import Prepared
    e, q = load_joint_embeddings(run_dir(cfg))
    n_items = Prepared(run_dir(cfg, "data")).n_items
    assert e.shape == (n_items + 1, cfg.stage1.latent) and q.shape == e.shape
    assert np.isfinite(e).all() and np.isfinite(q).all()
    assert e[1:].std(0).mean() > 1e-3  # not collapsed to a constant
    hist = json.loads((run_dir(cfg, "stage1") / "metrics.json").read_text())["history"]
    # 2 epochs although rank 0 failed at epoch 2 (the fixture's injected failure): resumed, not restarted
    assert [h["epoch"] for h in hist] == [1, 2] and hist[-1]["total"] < hist[0]["total"]
    assert (run_dir(cfg, "stage1") / "loss.png").stat().st_size > 0


def test_stage2_zero3_partitions_the_llm_over_two_workers(trained_tiny):
    _, out = trained_tiny
    m = json.loads((out / "manifest.json").read_text())
    f = m["final"]
    assert m["zero_stage"] == 3 and m["workers"] == 2
    local = f["llm_params_local_per_rank"]
    assert len(local) == 2 and all(0 < n < f["llm_params_full"] for n in local)
    assert sum(local) >= f["llm_params_full"]  # every element held somewhere (partitions are padded)
    from safetensors.numpy import load_file
    proj = load_file(str(out / "projector.safetensors"))
    assert any(k.startswith("user_proj") for k in proj) and any(k.startswith("item_proj") for k in proj)
    assert not any("llm" in k for k in proj)  # only the projectors are exported


def test_stage2_continues_a_finished_run_and_resumes_after_a_failure(trained_tiny, tmp_path, capsys):
    from pipelines.stage2 import stage2
    from allmrec.config import config_from_dict
    cfg = config_from_dict(trained_tiny[0].to_dict())
    lr = cfg.stage2.lr
    cfg.stage2.epochs, cfg.stage2.num_workers, cfg.stage2.item_tokens = 2, 1, "mlp"  # MLP-LLM variant
    cfg.stage2.zero_stage, cfg.cf.max_failures = 3, 1
    cfg.stage2.bucket_window = 2  # batches bucketed by prompt length: resumed and continued like plain ones
    out = stage2(cfg, fail_at_epoch=2)  # rank 0 fails at epoch 2; the job resumes from epoch 1's checkpoint
    hist = json.loads((out / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and out.name == "mlp-u1"
    assert all(0 <= h["padding"] < 0.5 for h in hist)  # the share of padded prompt positions, per epoch

    # --continue: a third epoch on top of the two, from their checkpoint (optimizer state included)
    cfg.stage2.epochs = 3
    again = stage2(cfg, extend=True)
    m = json.loads((again / "manifest.json").read_text())
    hist3 = json.loads((again / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist3] == [1, 2, 3] and hist3[:2] == hist
    assert m["continued_from"]["epochs"] == 2 and m["epochs_run"] == 3
    with pytest.raises(ValueError, match="already has 3 epochs"):
        cfg.stage2.epochs = 2
        stage2(cfg, extend=True)
    with pytest.raises(ValueError, match="other settings"):
        cfg.stage2.epochs, cfg.stage2.lr = 4, 1e-3
        stage2(cfg, extend=True)

    # the command line: the continued run is up to date, and its summary says what was continued
    from pipelines.cli import main
    cfg.stage2.epochs, cfg.stage2.lr = 3, lr
    cfg.dump(tmp_path / "c.yaml")
    assert main(["stage2", "-c", str(tmp_path / "c.yaml"), "--continue"]) == 0
    assert "3 epochs (epoch 3 here, on top of a 2-epoch run)" in capsys.readouterr().out
    assert main(["stage2", "-c", str(tmp_path / "c.yaml"), "--continue", "stage2.epochs=2"]) == 1
    assert "already has 3 epochs" in capsys.readouterr().err


def test_stage1_and_stage2_record_the_cf_weights_they_read(trained_tiny):
    from allmrec.artifacts import RunFolder
    cfg, s2 = trained_tiny
    rf = RunFolder(cfg)
    ident = {"model": "sasrec", "sha256": rf.cf_checksum()}
    for folder in (rf.stage1, s2):
        assert json.loads((folder / "manifest.json").read_text())["cf_weights"] == ident
    assert (rf.stage1 / "config.yaml").is_file() and (s2 / "config.yaml").is_file()


def _eval_cfg(trained_tiny):
    from allmrec.config import config_from_dict
    cfg = config_from_dict(trained_tiny[0].to_dict())
    cfg.eval.max_users, cfg.eval.mode, cfg.eval.batch_size = 6, "both", 3
    cfg.eval.variants = ["cf", "most_popular", "llm_only", "allmrec"]
    cfg.eval.max_new_tokens = 4
    return cfg


def test_evaluate_writes_a_parseable_report(trained_tiny):
    from pipelines.evaluate import evaluate
    cfg = _eval_cfg(trained_tiny)
    out = evaluate(cfg)
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["metrics"]) == {"sasrec", "most_popular", "llm_only", "allmrec"}
    for v, scen in rep["metrics"].items():
        o = scen["overall"]
        assert o["n"] == 6 and 0 <= o["hit@1"] <= o["hit@5"] <= o["hit@10"] <= 1
    assert "gen_hit@1" in rep["metrics"]["allmrec"]["overall"]
    # every other model against the CF model on the same cases: the difference of the two Hit@1s
    paired = rep["paired"]["hit@1"]
    assert rep["paired"]["base"] == "sasrec" and set(paired) == {"most_popular", "llm_only", "allmrec"}
    m = rep["metrics"]
    assert paired["allmrec"]["overall"]["diff"] == pytest.approx(
        m["allmrec"]["overall"]["hit@1"] - m["sasrec"]["overall"]["hit@1"])
    assert paired["allmrec"]["overall"]["n"] == 6
    md = (out / "report.md").read_text()
    assert "| allmrec |" in md and (out / "hit1.png").stat().st_size > 0
    assert "## Against the CF model (sasrec), paired" in md
    res = pd.read_parquet(out / "results.parquet")
    assert len(res[res.variant == "allmrec"]) == len(res[res.variant == "sasrec"])
    assert (out / "config.yaml").is_file() and json.loads((out / "manifest.json").read_text())["job"] == "evaluate"


def test_candidates_in_the_cf_models_order_train_evaluate_and_stay_tied_to_it(trained_tiny, tmp_path):
    """stage2.candidate_order=cf through the jobs a user runs: Stage-2 trains on prompts listing the
    candidates best CF score first, evaluate ranks with the same order and writes the comparison with the
    CF model, and the projector refuses the paper's seeded order it was not trained on."""
    from allmrec.artifacts import RunFolder
    from allmrec.config import config_from_dict
    from pipelines.evaluate import evaluate
    from pipelines.stage2 import stage2
    cfg = config_from_dict(trained_tiny[0].to_dict())
    run = tmp_path / "cf-order"  # the fixture's data, CF model and Stage-1; its own Stage-2 and report
    run.mkdir()
    for part in ("data", "encode", "cf", "stage1"):
        (run / part).symlink_to(Path(cfg.run_dir) / part)
    cfg.run_dir, cfg.stage2.candidate_order = str(run), "cf"
    cfg.stage2.num_workers, cfg.stage2.zero_stage, cfg.stage2.deepspeed_config = 1, 0, "configs/deepspeed/zero0.json"
    out = stage2(cfg)
    assert "candidate_order: cf" in (out / "config.yaml").read_text()
    cfg.eval.max_users, cfg.eval.mode, cfg.eval.batch_size, cfg.eval.max_new_tokens = 6, "both", 3, 4
    cfg.eval.variants = ["cf", "llm_only", "allmrec"]
    rep = json.loads((evaluate(cfg) / "report.json").read_text())
    assert rep["metrics"]["allmrec"]["overall"]["n"] == 6 and "gen_hit@1" in rep["metrics"]["allmrec"]["overall"]
    assert set(rep["paired"]["hit@1"]) == {"llm_only", "allmrec"}
    rec, _, _ = RunFolder(cfg).load_recommender("allmrec")
    assert rec.candidate_order == "cf" and rec.cf_items is not None
    assert RunFolder(cfg).load_recommender("llm_only")[0].candidate_order == "seeded"  # it sees no CF input
    with pytest.raises(ValueError, match="cross-domain"):  # the source CF model has no scores for other items
        RunFolder(cfg).load_recommender("allmrec", item_table=tmp_path / "target-items.parquet")
    # the ablation switch: LLM-Only in the CF order too; the A-LLMRec projector's order is unchanged by it
    cfg.stage2.order_baselines = True
    assert RunFolder(cfg).load_recommender("llm_only")[0].candidate_order == "cf"
    assert RunFolder(cfg).load_recommender("allmrec")[0].candidate_order == "cf"
    cfg.eval.variants, cfg.eval.mode = ["llm_only"], "rank"
    out = evaluate(cfg)
    assert json.loads((out / "report.json").read_text())["metrics"]["llm_only"]["overall"]["n"] == 6
    assert "for LLM-Only and TALLRec too" in (out / "report.md").read_text()
    cfg.stage2.order_baselines = False
    cfg.stage2.candidate_order = "seeded"
    with pytest.raises(ValueError, match="candidate_order=cf"):
        RunFolder(cfg).load_recommender("allmrec")


def test_an_edited_prompt_template_reruns_stage2_and_evaluate(trained_tiny, monkeypatch):
    """Unchanged inputs: Stage-2 and evaluate are skipped. A changed prompt text (the template's words):
    both run again (here they stop at their first Ray call, which a skipped job never makes)."""
    from allmrec.llm import prompt
    from pipelines import evaluate as ev
    from pipelines import stage2 as s2

    cfg, out = trained_tiny
    ecfg = _eval_cfg(trained_tiny)
    report = ev.evaluate(ecfg)  # up to date when test_evaluate_writes_a_parseable_report ran first

    def rerun(_cfg):
        raise RuntimeError("runs again")
    monkeypatch.setattr(s2, "init_ray", rerun)
    monkeypatch.setattr(ev, "init_ray", rerun)
    stamps = [(p / "manifest.json").stat().st_mtime_ns for p in (out, report)]
    s2.stage2(cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})  # skipped
    ev.evaluate(ecfg)  # skipped
    assert [(p / "manifest.json").stat().st_mtime_ns for p in (out, report)] == stamps

    init = prompt.PromptBuilder.__init__

    def edited(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._ask = self._ask.replace("Recommend", "Suggest")
    monkeypatch.setattr(prompt.PromptBuilder, "__init__", edited)
    with pytest.raises(RuntimeError, match="runs again"):
        s2.stage2(cfg, ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    with pytest.raises(RuntimeError, match="runs again"):
        ev.evaluate(ecfg)


def test_score_is_complete_and_resumable(trained_tiny, monkeypatch):
    from allmrec.config import config_from_dict
    from pipelines import score as sc
    monkeypatch.setattr(sc, "CHUNK", 4)
    cfg = config_from_dict(trained_tiny[0].to_dict())
    cfg.score.max_users, cfg.score.top_k, cfg.score.pool_size = 10, 3, 5
    from allmrec.artifacts import RunFolder
    leftover = RunFolder(cfg).scores.with_name("scores.tmp-0123abcd")  # a killed run's temporary folder
    leftover.mkdir(parents=True, exist_ok=True)
    out = sc.score(cfg)
    assert not leftover.exists()  # removed by the next run of the job
    assert (out / "config.yaml").is_file()
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    df = pd.concat([pq.read_table(p).to_pandas() for p in parts])
    assert sorted(df.user.unique()) == list(range(10)) and (df.groupby("user").size() == 3).all()
    from allmrec.data.load import Prepared
    seqs = dict(zip(*Prepared(out.parent / "data").sequences[["user", "seq"]].T.values))
    assert not any(i in set(seqs[u]) for u, i in zip(df.user, df.item))  # never recommends the history
    # simulate a job killed after two chunks: the third is redone, nothing else
    parts[2].unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    sc.score(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["users_scored_this_run"] == 2
    monkeypatch.setattr(sc, "init_ray", lambda _cfg: (_ for _ in ()).throw(RuntimeError("runs again")))
    sc.score(cfg)  # complete and unchanged: skipped
    cfg.score.top_k = 2
    with pytest.raises(RuntimeError, match="runs again"):
        sc.score(cfg)  # another setting: redone


@pytest.mark.parametrize("layers", [0, 1])  # the fixture's frozen SBERT (pooled cache); the top layer trained
def test_stage1_item_table_from_rank0_equals_the_ray_data_job(trained_tiny, layers):
    """Stage-1's rank 0 writes the item table from its cached lower SBERT layers (no second SBERT pass);
    it must be the table the Ray Data job (ZeRO-3, table_on_worker=false, cross-domain) computes."""
    from safetensors.torch import load as st_load

    from allmrec.artifacts import RunFolder, read_item_table
    from allmrec.config import config_from_dict
    from pipelines.joint import JointEmbedder, build_stage1_model, item_arrays
    from pipelines.workers import item_texts_from

    cfg, _ = trained_tiny
    rf = RunFolder(cfg)
    c = config_from_dict(cfg.to_dict())
    c.stage1.sbert_trainable_layers = layers
    prep = rf.prepared()
    texts = item_texts_from({"item": prep.items["item"].to_numpy(), "text": prep.items["text"].to_numpy()})
    cf_files, export = rf.cf_files(), rf.stage1_export_path.read_bytes()
    ref = JointEmbedder(c.to_dict(), [(cf_files, export, texts)], threads=1)(
        {"item": np.arange(len(texts), dtype=np.int64)})

    cf = rf.load_cf()
    model = build_stage1_model(c, cf.hidden)
    model.load_state_dict(st_load(export), strict=False)
    model.text_encoder.pretokenize(texts, c.encode.max_seq_length)
    model.text_encoder.precompute_lower(64)
    with torch.no_grad():
        e, q = item_arrays(model, cf.item_embeddings())
    np.testing.assert_allclose(e, np.stack(ref["e"]), atol=1e-5)
    np.testing.assert_allclose(q, np.stack(ref["q"]), atol=1e-5)
    if layers == cfg.stage1.sbert_trainable_layers:  # the job's own table: written by its rank 0
        e_job, q_job = read_item_table(rf.joint_emb_path)
        np.testing.assert_allclose(e_job, e, atol=1e-5)
        np.testing.assert_allclose(q_job, q, atol=1e-5)
        assert json.loads((rf.stage1 / "metrics.json").read_text())["table_seconds"] >= 0
