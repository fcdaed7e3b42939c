"""The prepare job end to end on small files: k-core to a fixed point, splits, seeded candidates,
atomic output."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from allmrec.config import load_config
from allmrec.data.load import Prepared
from pipelines import prepare as prep

pytestmark = pytest.mark.ray


def _write_seq_txt(folder: Path, seqs: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "user_sequence.txt").write_text("".join(f"{u} {' '.join(s)}\n" for u, s in seqs.items()))
    items = sorted({i for s in seqs.values() for i in s})
    (folder / "item_generative_indexing_phase_0.txt").write_text("".join(f"{i} title of {i}\n" for i in items))


def _cfg(tmp_path: Path, data_dir: Path, *extra: str):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=seq_txt", f"data.path={data_dir}",
                              "ray.num_cpus=4", *extra])


def test_kcore_reaches_fixed_point_where_one_pass_does_not(ray_session, tmp_path):
    # k=3. A ring of 30 users over 30 items (each item 3 interactions); u1, u2 and u4 share item "z".
    # u4's other items are rare: pass 1 removes r1, r2 -> u4 keeps 1 item and is dropped -> z falls to 2
    # -> pass 2 removes z -> u1, u2 fall to 2 items and are dropped. One counting pass would keep z and u4.
    g = [f"g{i:02d}" for i in range(30)]
    seqs = {f"w{j:02d}": [g[j], g[(j + 1) % 30], g[(j + 2) % 30]] for j in range(30)}
    seqs.update({"u1": [g[0], g[10], "z"], "u2": [g[5], g[15], "z"], "u4": ["r1", "z", "r2"]})
    _write_seq_txt(tmp_path / "d", seqs)
    cfg = _cfg(tmp_path, tmp_path / "d", "data.k_core=3", "data.cold_users=none")
    out = prep.prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["k_core_iterations"] >= 2
    p = Prepared(out)
    assert sorted(p.items["raw_id"]) == g
    assert p.n_train_users == 30
    assert not {"u1", "u2", "u4"} & set(p.users["raw_id"])
    for s in p.sequences["seq"]:
        assert len(s) == 3
    # single-pass check: every surviving item has >= k interactions and every user >= k items
    counts = np.bincount(np.concatenate(p.sequences["seq"].to_numpy()))
    assert counts[1:].min() >= 3


def _real_like(tmp_path: Path, n_users: int = 60, n_items: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    seqs = {f"user{u:03d}": [f"i{x:03d}" for x in rng.choice(n_items, size=rng.integers(6, 15), replace=False)]
            for u in range(n_users)}
    _write_seq_txt(tmp_path / "d", seqs)
    return tmp_path / "d"


def test_splits_and_candidates(ray_session, tmp_path):
    d = _real_like(tmp_path)
    out = prep.prepare(_cfg(tmp_path, d, "data.k_core=2", "data.cold_users=holdout",
                            "data.cold_user_fraction=0.2", "data.fewshot_k=[8,16]"))
    p = Prepared(out)
    seqs = dict(zip(p.sequences["user"], p.sequences["seq"]))
    for split, cut in (("valid", 2), ("test", 1)):
        c = p.candidates(split)
        assert len(c) == p.n_train_users
        for u, t, negs, hist in zip(c["user"], c["target"], c["negatives"], c["history"]):
            s = list(seqs[u])
            assert t == s[-cut] and list(hist) == s[:-cut]
            cands = [t, *negs]
            assert len(cands) == 20 and len(set(cands)) == 20
            assert not set(negs) & set(s), "a negative is in the user's history"
            assert min(cands) >= 1 and max(cands) <= p.n_items
    cold = p.candidates("cold_users")
    assert len(cold) > 0 and all(len(h) == 2 for h in cold["history"])
    cold_ids = set(p.users.loc[p.users["cold_user"], "user"])
    assert cold_ids == set(cold["user"]) and not cold_ids & set(seqs)
    assert min(cold_ids) == p.n_train_users  # cold users get ids after all training users
    fs = p.fewshot
    small, big = set(fs.loc[fs.k == 8, "user"]), set(fs.loc[fs.k == 16, "user"])
    assert len(small) == 8 and len(big) == 16 and small <= big and not big & cold_ids


def test_candidates_identical_across_runs_and_block_counts(ray_session, tmp_path, monkeypatch):
    d = _real_like(tmp_path, n_users=80)
    out1 = prep.prepare(_cfg(tmp_path / "a", d, "data.k_core=2"))
    c1 = Prepared(out1).candidates("test")
    monkeypatch.setattr(prep, "_num_blocks", lambda n_rows: 7)
    out2 = prep.prepare(_cfg(tmp_path / "b", d, "data.k_core=2"))
    c2 = Prepared(out2).candidates("test")
    assert c1["user"].tolist() == c2["user"].tolist()
    assert [list(x) for x in c1["negatives"]] == [list(x) for x in c2["negatives"]]
    # a different seed gives different negatives
    out3 = prep.prepare(_cfg(tmp_path / "c", d, "data.k_core=2", "seed=7"))
    c3 = Prepared(out3).candidates("test")
    assert [list(x) for x in c1["negatives"]] != [list(x) for x in c3["negatives"]]


def test_rerun_is_reused_and_failure_mid_write_leaves_nothing_half_written(ray_session, tmp_path, monkeypatch):
    d = _real_like(tmp_path)
    cfg = _cfg(tmp_path, d, "data.k_core=2")
    out = prep.prepare(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prep.prepare(cfg) == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # reused

    calls = {"n": 0}
    real_write = prep._write_ray

    def failing_write(ds, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure mid-write")
        real_write(ds, path)

    monkeypatch.setattr(prep, "_write_ray", failing_write)
    with pytest.raises(RuntimeError, match="injected"):
        prep.prepare(cfg, force=True)
    # the previous complete output is untouched and no temporary folder is left behind
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    assert [p.name for p in out.parent.iterdir()] == ["data"]


def test_malformed_rows_are_counted_not_fatal(ray_session, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    rows = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    rng = np.random.default_rng(1)
    for u in range(30):
        for j, i in enumerate(rng.choice(40, 8, replace=False)):
            rows.append(f"u{u}\ti{i}\t{rng.integers(1, 6)}\t{1000 + j}")
    rows += ["u1\ti1\tnot-a-number\t5", "only-two\tcolumns", "u2\t\t3\t7"]
    (d / "toy.inter").write_text("\n".join(rows) + "\n")
    (d / "toy.item").write_text("item_id:token\tmovie_title:token_seq\n" + "".join(f"i{i}\tMovie {i}\n" for i in range(40)))
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=recbole", f"data.path={d}",
                             "data.k_core=2", "data.rating_threshold=2"])
    out = prep.prepare(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert sum(v for k, v in m["dropped_rows"].items() if k != "rating_filter") == 3
    assert m["dropped_rows"]["rating_filter"] > 0
    assert m["counts"]["rows_valid"] == 240


def test_scientific_five_core_counts(ray_session, shared_data, tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "data.format=seq_json",
                             f"data.path={shared_data / 'amazon-scientific'}", "data.k_core=5"])
    m = json.loads((prep.prepare(cfg) / "manifest.json").read_text())
    c = m["counts"]
    assert (c["k_core_users"], c["items"], c["k_core_interactions"]) == (8317, 4344, 58492)
    assert c["cold_user_rule"] == "holdout" and c["cold_users"] > 0
