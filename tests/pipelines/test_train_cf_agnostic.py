"""Every registered CF model through the run folder and Stage-1.

Ray-free, for each model of the registry: saved to its own cf/<model>/ beside the others, shipped to
Stage-1 as bytes (what the job sends its workers), one Stage-1 training step on it (the job's own batch
code), and Stage-1's item table made from it (the job's own actor class, in-process). With Ray, the real
jobs on two models in one run folder: Stage-1 trained on GRU4Rec records its weights' checksum, its table is
f_I^enc of GRU4Rec's item embeddings, evaluate scores both CF models, and a missing model is one clear error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allmrec.artifacts import MissingArtifact, RunFolder, files_sha256, read_item_table
from allmrec.cf import CF_MODELS, build_cf_model
from allmrec.config import load_config

N_ITEMS, N_USERS = 30, 12


def _sequences():
    import pyarrow as pa
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, N_ITEMS + 1), size=int(rng.integers(5, 9)), replace=False).tolist()
            for _ in range(N_USERS)]
    return pa.table({"user": pa.array(range(N_USERS), pa.int64()), "seq": pa.array(seqs, pa.list_(pa.int64()))})


def _aligner_e(export: dict, cf) -> np.ndarray:
    """e = f_I^enc(E) recomputed from the exported aligner weights and the CF model."""
    from allmrec.align.stage1 import Stage1Aligner, joint_embeddings
    state = {k.removeprefix("aligner."): v for k, v in export.items() if k.startswith("aligner.")}
    latent, cf_dim = state["item_enc.0.weight"].shape
    aligner = Stage1Aligner(int(cf_dim), int(state["text_enc.0.weight"].shape[1]), int(latent))
    aligner.load_state_dict(state)
    with torch.no_grad():
        return joint_embeddings(aligner, cf.item_embeddings()).numpy()


@pytest.mark.parametrize("model", sorted(CF_MODELS))
def test_stage1_trains_on_and_tabulates_every_registered_cf_model(model, tmp_path):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from allmrec.artifacts import cf_from_files
    from pipelines.joint import JointEmbedder, build_stage1_model
    from pipelines.rows import stage1_examples
    from pipelines.stage1 import stage1_batch

    overrides = [f"run_dir={tmp_path}", f"cf.model={model}", "cf.hidden=8", "cf.max_len=6", "stage1.latent=8",
                 "stage1.sbert_trainable_layers=0", "encode.max_seq_length=16"]
    cfg = load_config(None, overrides)
    rf = RunFolder(cfg)
    # another model already in the run folder: it must stay as it is
    keep = "gru4rec" if model != "gru4rec" else "sasrec"
    torch.manual_seed(1)
    build_cf_model(keep, N_ITEMS, N_USERS, {"hidden": 8, "max_len": 6}).save(rf.cf_dir(keep))
    (rf.cf_dir(keep) / "manifest.json").write_text(json.dumps({"fingerprint": "x", "model": keep}))
    kept = rf.cf_checksum(keep)
    with pytest.raises(MissingArtifact, match=f"cf.model={model}"):
        rf.cf_files()

    torch.manual_seed(0)
    inputs = {"text_emb": np.random.default_rng(0).random((N_ITEMS + 1, 12), dtype=np.float32)} \
        if getattr(CF_MODELS[model], "needs_text_embeddings", False) else {}
    build_cf_model(model, N_ITEMS, N_USERS, vars(cfg.cf), **inputs).save(rf.cf_dir())  # as train-cf saves
    (rf.cf_dir() / "manifest.json").write_text(json.dumps({"fingerprint": "y", "model": model}))
    assert rf.cf_checksum(keep) == kept and rf.cf_dir() != rf.cf_dir(keep)

    files = rf.cf_files()  # what stage1/stage2 ship to their workers
    assert files_sha256(files) == rf.cf_checksum()
    cf = cf_from_files(files)
    assert cf.name == model and not any(p.requires_grad for p in cf.parameters())
    E = cf.item_embeddings().detach()

    texts = [""] + [f"Title: item {i}, Description: red lamp {i % 7}" for i in range(1, N_ITEMS + 1)]
    s1 = build_stage1_model(cfg, cf.hidden)
    s1.text_encoder.pretokenize(texts, cfg.encode.max_seq_length)
    train = stage1_examples(_sequences(), all_items=False, max_len=cfg.cf.max_len)
    losses = s1(stage1_batch(cf, E, train, np.arange(8), np.random.default_rng(0)))
    losses["total"].backward()
    assert torch.isfinite(losses["total"]) and s1.aligner.item_enc[0].weight.grad.abs().sum() > 0

    export = st_save({k: v.detach().contiguous() for k, v in s1.state_dict().items() if k.startswith("aligner.")})
    embedder = JointEmbedder(cfg.to_dict(), [(files, export, texts)], threads=1)
    table = embedder({"item": np.arange(N_ITEMS + 1, dtype=np.int32)})
    np.testing.assert_allclose(np.stack(table["e"]), _aligner_e(st_load(export), rf.load_cf()), atol=1e-6)
    assert np.isfinite(np.stack(table["q"])).all()


pipeline = pytest.mark.ray


@pipeline
def test_two_cf_models_in_one_run_folder_and_stage1_reads_the_configured_one(tiny_cfg_factory):
    from allmrec.config import config_from_dict
    from pipelines.evaluate import evaluate
    from pipelines.stage1 import stage1
    from pipelines.stage2 import stage2
    from pipelines.train_cf import train_cf
    from tests.pipelines.conftest import CF_GRU4REC, CF_SASREC

    sas, gru = tiny_cfg_factory(*CF_SASREC), tiny_cfg_factory(*CF_GRU4REC)
    rf_sas, rf_gru = RunFolder(sas), RunFolder(gru)
    assert rf_sas.root == rf_gru.root
    train_cf(sas)  # both up to date when tests/pipelines/test_train_cf.py trained them first
    train_cf(gru)
    assert rf_sas.load_cf().name == "sasrec" and rf_gru.load_cf().name == "gru4rec"

    missing = tiny_cfg_factory(*CF_GRU4REC, "cf.model=nextitnet")
    for job in (stage1, stage2):
        with pytest.raises(MissingArtifact, match=r"allmrec train-cf .*cf\.model=nextitnet"):
            job(missing)

    cfg = tiny_cfg_factory(*CF_GRU4REC, "stage1.epochs=1", "stage1.sbert_trainable_layers=0", "stage1.batch_size=16",
                           "stage1.max_users=32", "stage1.latent=16", "encode.max_seq_length=32")
    out = stage1(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["cf_weights"] == {"model": "gru4rec", "sha256": rf_gru.cf_checksum()} != rf_sas.cf_identity()
    from safetensors.torch import load_file
    e, _ = read_item_table(rf_gru.joint_emb_path)
    np.testing.assert_allclose(e, _aligner_e(load_file(str(rf_gru.stage1_export_path)), rf_gru.load_cf()), atol=1e-5)
    rf_gru.check_cf(out, "stage1")
    with pytest.raises(ValueError, match="trained on the CF model 'gru4rec'"):
        rf_sas.check_cf(out, "stage1")

    ev = config_from_dict(cfg.to_dict())
    ev.eval.variants, ev.eval.max_users = ["cf", "sasrec", "most_popular"], 10
    rep = json.loads((evaluate(ev) / "report.json").read_text())
    assert list(rep["metrics"]) == ["gru4rec", "sasrec", "most_popular"]  # "cf" is the configured model
    ranks = {v: rep["metrics"][v]["overall"]["mrr"] for v in ("gru4rec", "sasrec")}
    assert ranks["gru4rec"] != ranks["sasrec"]  # two models scored, not one twice
