"""`allmrec genres` end to end on a hand-written run folder (no Ray): tiny data with genres, an untrained
SASRec, random Stage-1 vectors and Stage-2 projector, and conftest's tiny random Llama."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from allmrec.config import load_config

GENRES = ["Drama", "Comedy", "Sci-Fi", "Children's", "Film-Noir"]
N_ITEMS, N_USERS = 15, 12


def _save_tiny_llama(folder: Path) -> Path:
    """conftest's tiny random Llama (a conftest module cannot be imported by name: several share it)."""
    spec = importlib.util.spec_from_file_location("_pipelines_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.save_tiny_llama(folder)


def _write_data(data: Path, with_categories: bool = True) -> None:
    """Items 1..15, genre of item i: GENRES[i % 5] (+ Drama for every third); user u's sequence starts with
    three items of genre u % 5, then cycles through the catalogue."""
    data.mkdir(parents=True)
    cats = [" | ".join(dict.fromkeys([GENRES[i % 5]] + (["Drama"] if i % 3 == 0 else []))) for i in range(1, N_ITEMS + 1)]
    items = pd.DataFrame({"item": np.arange(1, N_ITEMS + 1, dtype=np.int32),
                          "raw_id": [str(i) for i in range(1, N_ITEMS + 1)],
                          "title": [f"red model {i}" for i in range(1, N_ITEMS + 1)],
                          "text": [f"Title: red model {i}" for i in range(1, N_ITEMS + 1)],
                          "categories": cats, "n_train": np.ones(N_ITEMS, dtype=np.int32), "group": "mid"})
    if not with_categories:
        items = items.drop(columns="categories")
    seqs, cands = [], []
    for u in range(N_USERS):
        g = u % 5
        own = [i for i in range(1, N_ITEMS + 1) if i % 5 == g][:3]
        rest = [i for i in range(1, N_ITEMS + 1) if i not in own][u % 4: u % 4 + 5]
        seq = own + rest
        seqs.append({"user": u, "seq": np.asarray(seq, dtype=np.int32)})
        negs = [i for i in range(1, N_ITEMS + 1) if i not in seq][:3]
        cands.append({"user": u, "target": seq[-1], "negatives": np.asarray(negs, dtype=np.int32),
                      "history": np.asarray(seq[:-1], dtype=np.int32)})
    items.to_parquet(data / "items.parquet")
    pd.DataFrame(seqs).to_parquet(data / "sequences.parquet")
    pd.DataFrame(cands).to_parquet(data / "candidates_test.parquet")
    (data / "manifest.json").write_text(json.dumps({"fingerprint": "hand-written"}))


@pytest.fixture(scope="module")
def genre_run(tmp_path_factory):
    import pyarrow as pa
    from safetensors.torch import save_file

    from allmrec.cf import build_cf_model
    from allmrec.recommender import build_projector

    root = tmp_path_factory.mktemp("genres")
    llm = _save_tiny_llama(root / "llm")
    run = root / "run"
    _write_data(run / "data")
    torch.manual_seed(0)
    build_cf_model("sasrec", N_ITEMS, N_USERS, {"hidden": 16, "max_len": 12}).save(run / "cf")
    rng = np.random.default_rng(0)
    (run / "stage1").mkdir()
    pq.write_table(pa.table({"item": np.arange(N_ITEMS + 1, dtype=np.int64),
                             "e": list(rng.normal(size=(N_ITEMS + 1, 16)).astype(np.float32)),
                             "q": list(rng.normal(size=(N_ITEMS + 1, 16)).astype(np.float32))}),
                   run / "stage1" / "joint_emb.parquet")
    (run / "stage2").mkdir()
    proj = build_projector("joint", True, 16, 16, 32)
    save_file({k: v.contiguous() for k, v in proj.state_dict().items()}, str(run / "stage2" / "projector.safetensors"))
    overrides = [f"run_dir={run}", f"stage2.llm={llm}", "cf.hidden=16", "cf.max_len=12", "stage2.history_len=5",
                 "eval.batch_size=4", "torch_threads=1"]
    return run, overrides


def test_genres_cli_writes_a_parseable_report(genre_run, capsys):
    from pipelines.cli import main

    run, overrides = genre_run
    assert main(["genres", *overrides, "allmrec", "llm_only", "--max-users", "7", "--max-new-tokens", "6"]) == 0
    out = run / "genres"
    assert "Favourite-genre generation" in capsys.readouterr().out
    assert not list(run.glob("genres.tmp-*"))  # the atomic folder was renamed
    rep = json.loads((out / "report.json").read_text())
    assert rep["meta"]["variants"] == ["allmrec", "llm_only"] and rep["meta"]["users"] == 7
    assert rep["meta"]["question"] == "Which item genres does this user like the most? The genres are"  # domain noun
    assert set(rep["metrics"]) == {"allmrec", "llm_only", "most_popular"}
    for m in rep["metrics"].values():
        assert m["n"] == 7 and 0 <= m["top1_hit"] <= 1 and 0 <= m["no_genre"] <= 1

    res = pd.read_parquet(out / "results.parquet")
    assert len(res) == 3 * 7 and res.groupby("variant")["user"].apply(list).map(sorted).map(tuple).nunique() == 1
    users = set(res["user"])
    assert len(users) == 7 and users <= set(range(N_USERS))
    # the top genres come from the training part seq[:-2]: the user's own genre (3 items) leads
    for r in res[res.variant == "llm_only"].itertuples():
        assert list(r.top_genres)[0] in (GENRES[r.user % 5], "Drama")
        assert set(r.genres) <= set(GENRES)
    # the fixed baseline answer is scored exactly: Drama is every user's top genre or tied with it
    pop = res[res.variant == "most_popular"]
    first = rep["meta"]["popular_genres"][0]
    assert first == "Drama" and pop["generated"].iloc[0].startswith("Drama")
    assert pop["top1_hit"].tolist() == [float(first in t) for t in pop["top_genres"]]
    assert rep["metrics"]["most_popular"]["no_genre"] == 0.0
    md = (out / "report.md").read_text()
    assert "| allmrec |" in md and "| llm_only |" in md and "### allmrec" in md and "### llm_only" in md
    assert md.count("\n| ") >= 3 + 2 * (1 + 5)  # table rows + 5 examples per variant (with headers)
    nan_or_unit = [math.isnan(p) or 0 <= p <= 1 for p in res["precision"]]
    assert all(nan_or_unit)


def test_genres_refuses_data_without_categories_and_unknown_variants(tmp_path, genre_run):
    from pipelines.cli import main
    from pipelines.genres import genres

    _, overrides = genre_run
    run = tmp_path / "run"
    _write_data(run / "data", with_categories=False)
    cfg = load_config(None, [*overrides, f"run_dir={run}"])
    with pytest.raises(ValueError, match="categories"):
        genres(cfg, ["llm_only"], max_users=3)
    assert main(["genres", *overrides, f"run_dir={run}", "llm_only"]) == 1
    with pytest.raises(ValueError, match="unknown"):
        genres(cfg, ["sasrec"])
