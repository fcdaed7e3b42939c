"""allmrec.artifacts.RunFolder: every artifact's place, CF models side by side, clear errors (no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allmrec.artifacts import (CF_WEIGHTS, MissingArtifact, RunFolder, cf_from_files, cf_top_n, files_sha256,
                               user_reps)
from allmrec.cf import CF_MODELS, build_cf_model
from allmrec.config import load_config


def _save_cf(directory, name: str, seed: int = 0, n_items: int = 30, n_users: int = 10):
    torch.manual_seed(seed)
    inputs = {"text_emb": np.random.default_rng(seed).random((n_items + 1, 8), dtype=np.float32)} \
        if getattr(CF_MODELS[name], "needs_text_embeddings", False) else {}
    model = build_cf_model(name, n_items, n_users, {"hidden": 8, "max_len": 6}, **inputs)
    model.save(directory)
    (directory / "manifest.json").write_text(json.dumps({"fingerprint": f"fp-{name}", "model": name}))
    return model


def test_every_registered_cf_model_has_its_own_folder_and_loads(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    rf = RunFolder(cfg)
    assert rf.cf_dir() == tmp_path.resolve() / "cf" / "sasrec" and rf.cf_model == "sasrec"
    for i, name in enumerate(CF_MODELS):
        _save_cf(rf.cf_dir(name), name, seed=i)
    sums = {name: rf.cf_checksum(name) for name in CF_MODELS}
    assert len(set(sums.values())) == len(CF_MODELS)  # side by side, none overwrote another
    for name in CF_MODELS:
        c = load_config(None, [f"run_dir={tmp_path}", f"cf.model={name}"])
        r = RunFolder(c)
        assert r.load_cf().name == name and r.cf_identity() == {"model": name, "sha256": sums[name]}
        files = r.cf_files()
        assert files_sha256(files) == sums[name] and cf_from_files(files).name == name


def test_missing_cf_model_names_the_command(tmp_path):
    rf = RunFolder(load_config(None, [f"run_dir={tmp_path}", "cf.model=gru4rec"]))
    with pytest.raises(MissingArtifact, match=r"allmrec train-cf .*cf\.model=gru4rec"):
        rf.load_cf()
    with pytest.raises(MissingArtifact, match="cf.model=gru4rec"):
        rf.cf_manifest()


def test_an_older_run_folder_with_its_model_directly_in_cf_is_still_read(tmp_path):
    _save_cf(tmp_path / "cf", "sasrec")
    sas = RunFolder(load_config(None, [f"run_dir={tmp_path}"]))
    assert sas.cf_found() == tmp_path.resolve() / "cf" and sas.load_cf().name == "sasrec"
    gru = RunFolder(load_config(None, [f"run_dir={tmp_path}", "cf.model=gru4rec"]))
    assert gru.cf_found() is None  # cf/ holds a SASRec: never handed out as another model
    _save_cf(gru.cf_dir(), "gru4rec")
    assert gru.load_cf().name == "gru4rec" and sas.load_cf().name == "sasrec"


def test_a_stage_trained_on_other_cf_weights_is_refused(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    rf = RunFolder(cfg)
    _save_cf(rf.cf_dir(), "sasrec", seed=0)
    rf.stage1.mkdir(parents=True)
    (rf.stage1 / "manifest.json").write_text(json.dumps({"cf_weights": rf.cf_identity()}))
    rf.check_cf(rf.stage1, "stage1")  # the same weights: fine
    _save_cf(rf.cf_dir(), "sasrec", seed=1)  # the CF model was retrained since
    with pytest.raises(ValueError, match=r"run `allmrec stage1 .*cf\.model=sasrec` again"):
        rf.check_cf(rf.stage1, "stage1")


def test_paths_of_every_artifact(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    rf, root = RunFolder(cfg), tmp_path.resolve()
    assert rf.data == root / "data" and rf.encode == root / "encode" and rf.stage1 == root / "stage1"
    assert rf.stage2() == root / "stage2" and rf.stage2("mlp_llm") == root / "stage2" / "mlp-u1"
    assert rf.stage2("allmrec_no_user") == root / "stage2" / "joint-u0"
    cfg.stage2.item_tokens = "sbert"
    assert RunFolder(cfg).stage2() == root / "stage2" / "sbert-u1"
    assert rf.tallrec == root / "tallrec" and rf.lora_path.parent == rf.tallrec
    assert rf.report() == root / "report" and rf.report(tmp_path / "src") == root / "report-from-src"
    assert rf.scores == root / "scores" and rf.score_part(3).name == "part-00003.parquet"
    assert rf.genres == root / "genres" and rf.ray_results == root / "ray_results"
    with pytest.raises(ValueError, match="unknown LLM variant"):
        rf.stage2("nope")
    with pytest.raises(MissingArtifact, match="allmrec stage1"):
        rf.item_table()


def test_cf_top_n_never_returns_padding_or_history():
    torch.manual_seed(0)
    cf = build_cf_model("sasrec", 12, 3, {"hidden": 8, "max_len": 6}).eval()
    hists = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    items, scores = cf_top_n(cf, hists, np.array([0, 1]), 20)
    assert items.shape == (2, 5)  # the second user has only 5 items left
    for row, h in zip(items, hists):
        assert 0 not in row and not set(row) & set(h)
    assert (np.diff(scores, axis=1) <= 0).all()
    x = user_reps(cf, hists, np.array([0, 1]))
    full = x @ cf.item_embeddings().detach().numpy().T
    assert items[0, 0] == max((i for i in range(1, 13) if i not in hists[0]), key=lambda i: full[0, i])
    again, _ = cf_top_n(cf, hists, np.array([0, 1]), 3, reps=x)
    assert (again == items[:, :3]).all()
    assert CF_WEIGHTS == "model.safetensors"


def test_a_killed_jobs_leftovers_are_removed_by_its_next_run(tmp_path):
    from allmrec.io import atomic_dir
    from pipelines.common import clear_leftovers, up_to_date

    out = tmp_path / "stage2"
    with atomic_dir(out) as tmp:
        (tmp / "manifest.json").write_text(json.dumps({"fingerprint": "fp1"}))
    left = [tmp_path / "stage2.tmp-0a1b2c3d", tmp_path / "stage2.old-9f8e7d6c", out / ".manifest.json.tmp-1234abcd",
            out / ".part-00002.ab12cd.tmp"]
    keep = [tmp_path / "stage1.tmp-0a1b2c3d", tmp_path / "stage2x.tmp-0a1b2c3d", out / "mlp-u1", out / "loss.png"]
    for p in left[:2] + keep[:3]:
        p.mkdir()
    for p in left[2:] + keep[3:]:
        p.write_text("x")
    assert not up_to_date("stage2", out, "fp2", force=False)  # another fingerprint: redo
    assert all(not p.exists() for p in left) and all(p.exists() for p in keep)
    assert up_to_date("stage2", out, "fp1", force=False) and not up_to_date("stage2", out, "fp1", force=True)
    assert clear_leftovers(tmp_path / "never-written") == []


def test_fingerprint_parts_follow_the_prompt_text_and_model_files(tmp_path, monkeypatch):
    from allmrec.llm import prompt
    from pipelines.fingerprints import model_identity, prompt_digest, prompt_text

    cfg = load_config("configs/ml100k.yaml")
    text = prompt_text(cfg)
    assert "Recommend a movie for this user to watch next" in text and "[user]" in text and "[item]" in text
    assert "[user]" not in prompt_text(cfg, "none", False) and "[item]" not in prompt_text(cfg, "none", False)
    before, position = prompt_digest(cfg), cfg.stage2.item_token_position
    cfg.stage2.item_token_position = "after" if position == "before" else "before"
    assert prompt_digest(cfg) != before  # the layout is in the text
    cfg.stage2.item_token_position = position
    init = prompt.PromptBuilder.__init__

    def edited(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self._history_outro = " before."
    monkeypatch.setattr(prompt.PromptBuilder, "__init__", edited)
    assert prompt_digest(cfg) != before  # an edited template word

    llm = tmp_path / "llm"
    llm.mkdir()
    (llm / "config.json").write_text("{}")
    first = model_identity(str(llm), "llm")
    (llm / "config.json").write_text('{"hidden_size": 8}')
    assert model_identity(str(llm), "llm") != first
    assert model_identity("packaged:SmolLM2-135M-Instruct", "llm").get("version")
