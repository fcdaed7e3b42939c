"""`allmrec export` and `ALLMRec.from_pretrained`: a tiny run folder (built here without Ray, random but real
in every format) round-trips with the same scores; TALLRec's LoRA is a PEFT adapter that PEFT itself loads."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from allmrec.config import load_config

TESTS = Path(__file__).resolve().parent
N_ITEMS, N_USERS = 30, 12


def _save_tiny_llama(folder: Path, titles: list[str]) -> Path:
    spec = importlib.util.spec_from_file_location("_pipelines_conftest", TESTS / "pipelines" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.save_tiny_llama(folder, titles, vocab_size=240)


def build_tiny_run(root: Path, with_report: bool = True):
    """data/, cf/sasrec/, stage1/, stage2/, tallrec/ (+ report/) as the jobs write them, random weights."""
    from safetensors.torch import save_file

    from allmrec.align.stage1 import Stage1Aligner
    from allmrec.cf import build_cf_model
    from allmrec.llm.lora import add_lora, lora_state, save_lora
    from allmrec.recommender import build_projector

    rng = np.random.default_rng(0)
    words = ["red", "blue", "lamp", "glove", "bottle", "rope", "tent", "ball", "shoe", "cap"]
    titles = [f"{words[i % 10]} {words[(i // 10) % 10]} model {i}" for i in range(1, N_ITEMS + 1)]
    llm = _save_tiny_llama(root / "llm", titles)
    cfg = load_config(None, [f"run_dir={root / 'run'}", f"stage2.llm={llm}", "stage2.llm_dtype=float32",
                             "cf.hidden=16", "cf.max_len=12", "stage1.latent=8", "stage2.history_len=5",
                             "score.pool_size=6", "tallrec.lora_r=4", "tallrec.lora_alpha=8", "name=tiny"])
    run = Path(cfg.run_dir)
    data = run / "data"
    data.mkdir(parents=True)
    pd.DataFrame({"item": np.arange(1, N_ITEMS + 1, dtype=np.int32), "raw_id": [f"i{i}" for i in range(1, N_ITEMS + 1)],
                  "title": titles, "text": [f"Title: {t}" for t in titles], "n_train": np.ones(N_ITEMS, np.int32),
                  "group": ["mid"] * N_ITEMS}).to_parquet(data / "items.parquet")
    seqs = [rng.choice(np.arange(1, N_ITEMS + 1), size=int(rng.integers(5, 9)), replace=False).astype(np.int32)
            for _ in range(N_USERS - 2)]
    pd.DataFrame({"user": np.arange(N_USERS, dtype=np.int32), "raw_id": [f"u{u}" for u in range(N_USERS)],
                  "cold_user": [False] * (N_USERS - 2) + [True] * 2}).to_parquet(data / "users.parquet")
    pd.DataFrame({"user": np.arange(N_USERS - 2, dtype=np.int32), "seq": seqs}).to_parquet(data / "sequences.parquet")
    pd.DataFrame({"user": np.array([N_USERS - 2, N_USERS - 1], np.int32), "history": [[1, 2, 3], [4, 5, 6]],
                  "target": np.array([7, 8], np.int32), "negatives": [[9, 10], [11, 12]]}).to_parquet(
        data / "cold_users.parquet")
    (data / "manifest.json").write_text(json.dumps({"fingerprint": "tiny", "n_items": N_ITEMS}))

    torch.manual_seed(0)
    cf = build_cf_model("sasrec", N_ITEMS, N_USERS - 2, {"hidden": 16, "max_len": 12}).eval()
    cf.save(run / "cf" / "sasrec")
    (run / "cf" / "sasrec" / "manifest.json").write_text(json.dumps(
        {"fingerprint": "cf", "model": "sasrec", "test": {"model": {"hit@1": 0.25}}}))
    cfg.dump(run / "cf" / "sasrec" / "config.yaml")

    aligner = Stage1Aligner(16, 24, 8)
    (run / "stage1").mkdir()
    save_file({f"aligner.{k}": v.contiguous() for k, v in aligner.state_dict().items()},
              str(run / "stage1" / "export.safetensors"))
    e, q = rng.random((N_ITEMS + 1, 8), dtype=np.float32), rng.random((N_ITEMS + 1, 8), dtype=np.float32)
    pd.DataFrame({"item": np.arange(N_ITEMS + 1), "e": list(e), "q": list(q)}).to_parquet(run / "stage1" / "joint_emb.parquet")
    (run / "stage1" / "manifest.json").write_text(json.dumps({"fingerprint": "s1"}))

    proj = build_projector("joint", True, 16, 8, 32)
    for p in proj.parameters():  # not the init: any mix-up of weights would show in the scores
        torch.nn.init.normal_(p, std=0.3)
    (run / "stage2").mkdir()
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(run / "stage2" / "projector.safetensors"))
    cfg.dump(run / "stage2" / "config.yaml")
    (run / "stage2" / "manifest.json").write_text(json.dumps({"fingerprint": "s2", "epochs_run": 1,
                                                             "train_seconds": 1.5}))

    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(str(llm), dtype=torch.float32)
    lora = add_lora(base, r=4, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if ".lora_B." in n:
                p.normal_(std=0.5)  # B = 0 at init would make the adapters a no-op
    (run / "tallrec").mkdir()
    save_lora(lora_state(lora), run / "tallrec" / "lora.safetensors")
    cfg.dump(run / "tallrec" / "config.yaml")
    if with_report:
        (run / "report").mkdir()
        (run / "report" / "report.json").write_text(json.dumps({
            "meta": {"users_overall": 9, "mode": "rank"},
            "metrics": {"sasrec": {"overall": {"hit@1": 0.3333, "hit@5": 0.7778, "ndcg@10": 0.5, "n": 9}},
                        "allmrec": {"overall": {"hit@1": 0.1111, "hit@5": 0.5556, "ndcg@10": 0.4, "n": 9}}}}))
    return load_config(run / "stage2" / "config.yaml", check_files=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from allmrec.export import export_run
    root = tmp_path_factory.mktemp("export")
    cfg = build_tiny_run(root)
    out = export_run(cfg.run_dir, root / "exported")
    return cfg, out


def _examples(cfg):
    from allmrec.artifacts import RunFolder, user_reps
    from allmrec.recommender import Example
    rf = RunFolder(cfg)
    cf, prep = rf.load_cf(), rf.prepared()
    hists = [list(s) for s in prep.sequences["seq"][:4]]
    reps = user_reps(cf, hists, list(range(4)))
    return [Example(reps[i], hists[i], [c for c in range(1, N_ITEMS + 1) if c not in hists[i]][:5]) for i in range(4)]


def test_export_round_trips_the_scores(tiny):
    from allmrec import ALLMRec
    from allmrec.artifacts import RunFolder
    cfg, out = tiny
    exs = _examples(cfg)
    before, _, _ = RunFolder(cfg).load_recommender("allmrec")
    m = ALLMRec.from_pretrained(out)
    assert m.variant == "allmrec" and m.path == out
    s0, s1 = before.rank(exs), m.recommender.rank(exs)
    assert s0.shape == (4, 5) and np.isfinite(s0).all()
    np.testing.assert_allclose(s1, s0, rtol=0, atol=1e-6)
    # recommend(): the same answer from the run folder and from the export, for a user and a history
    direct = ALLMRec.from_pretrained(cfg.run_dir)
    for kw in ({"user_id": 3}, {"history": [5, 9, 2]}, {"user_id": N_USERS - 1}):
        a, b = direct.recommend(k=4, **kw), m.recommend(k=4, **kw)
        assert len(a) == 4 and [r["item"] for r in a] == [r["item"] for r in b]
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-6)
        assert all(r["title"] and r["raw_id"].startswith("i") for r in b)
        assert [r["score"] for r in b] == sorted((r["score"] for r in b), reverse=True)
    hist = set(m._regular[3].tolist())
    assert not hist & {r["item"] for r in m.recommend(user_id=3, k=6)}  # never an item already seen
    with pytest.raises(ValueError, match="exactly one"):
        m.recommend(user_id=3, history=[1], k=2)
    with pytest.raises(ValueError, match="unknown user_id"):
        m.recommend(user_id=999)


def test_export_folder_is_hugging_face_style(tiny):
    from safetensors import safe_open
    cfg, out = tiny
    meta = json.loads((out / "config.json").read_text())
    assert meta["model_type"] == "allmrec" and meta["variant"] == "allmrec" and meta["cf_model"] == "sasrec"
    assert meta["n_items"] == N_ITEMS and meta["prompt"]["history_len"] == 5
    assert meta["prompt"]["candidate_order"] == "seeded"  # how the candidates are listed is part of the prompt
    for f in ("cf/sasrec/model.safetensors", "cf/sasrec/config.json", "stage1/export.safetensors", "stage1/joint_emb.parquet",
              "stage2/projector.safetensors", "data/items.parquet", "tallrec/adapter_config.json",
              "tallrec/adapter_model.safetensors", "README.md", "config.yaml"):
        assert (out / f).is_file() and f in meta["files"], f
    with safe_open(str(out / "stage1" / "export.safetensors"), "pt") as f:
        assert any(k.startswith("aligner.item_enc") for k in f.keys())
    card = (out / "README.md").read_text()
    # the run's measured metrics (report.json, manifests) and its settings, read from the run's files
    assert "| allmrec | 0.1111 | 0.5556 | 0.4000 | 9 |" in card and "| sasrec | 0.3333 |" in card
    assert "epochs_run 1" in card and "sasrec" in card and "history_len=5" in card
    assert load_config(out / "config.yaml", check_files=False).run_dir == str(out)


def test_tallrec_lora_is_a_peft_adapter(tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from allmrec import ALLMRec
    from allmrec.artifacts import RunFolder
    cfg, out = tiny
    conf = json.loads((out / "tallrec" / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    assert sorted(conf["target_modules"]) == ["q_proj", "v_proj"]
    # PEFT itself loads it: every adapter weight found (none left at its init), same logits as ours
    base = AutoModelForCausalLM.from_pretrained(cfg.stage2.llm, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out / "tallrec")).eval()
    n_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert n_b and all(p.abs().sum() > 0 for p in n_b)
    ours, _, _ = RunFolder(cfg).load_recommender("tallrec")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        np.testing.assert_allclose(peft_model(input_ids=ids).logits.numpy(), ours.llm(input_ids=ids).logits.numpy(),
                                   atol=1e-5)
    # and from_pretrained(variant="tallrec") scores as the run folder's TALLRec does
    m = ALLMRec.from_pretrained(out, variant="tallrec")
    exs = _examples(cfg)
    for e in exs:
        e.user_rep = None
    np.testing.assert_allclose(m.recommender.rank(exs), ours.rank(exs), atol=1e-6)


def test_cli_export(tmp_path, tiny, capsys):
    from pipelines.cli import main
    cfg, out = tiny
    dest = tmp_path / "again"
    assert main(["export", cfg.run_dir, str(dest), "--variant", "llm_only"]) == 0
    assert json.loads((dest / "config.json").read_text())["variant"] == "llm_only"
    assert "exported" in capsys.readouterr().out
    assert main(["export", cfg.run_dir, str(dest)]) == 1  # exists
    assert "--force" in capsys.readouterr().err
    assert main(["export", cfg.run_dir, str(tmp_path / "x"), "--variant", "allmrc"]) == 1
    assert "unknown LLM variant" in capsys.readouterr().err


def test_the_service_serves_an_export_as_the_library_does(tiny):
    """serve/'s CF and LLM deployments (their classes, without Ray) load the exported folder and answer what
    `ALLMRec.recommend` answers (what `allmrec serve --config OUT/config.yaml` runs)."""
    from allmrec import ALLMRec
    from allmrec.recommender import candidate_order
    from serve.deployments import CFDeployment, LLMDeployment
    _, out = tiny
    cfg = load_config(out / "config.yaml")
    cf = CFDeployment.func_or_class(cfg.to_dict(), 1)
    llm = LLMDeployment.func_or_class(cfg.to_dict(), "allmrec")
    m = ALLMRec.from_pretrained(out)
    for user in (3, 5):
        r = cf.represent(user, None, cfg.score.pool_size)
        cands = candidate_order(r["candidates"], cfg.seed, user=user, history=r["history"])
        (served,) = llm._run_batch([{"user_rep": r["user_rep"], "history": r["history"], "candidates": cands,
                                     "new_items": {}, "mode": "rank", "k": 4}])
        lib = m.recommend(user_id=user, k=4)
        assert [i for i, _, _ in served["items"]] == [x["item"] for x in lib]
        np.testing.assert_allclose([s for _, _, s in served["items"]], [x["score"] for x in lib], atol=1e-5)
