"""scripts/stage2_probe.py's small statistics on hand-computed cases."""
import importlib.util
from pathlib import Path

import numpy as np

spec = importlib.util.spec_from_file_location("stage2_probe", Path(__file__).parents[2] / "scripts" / "stage2_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_spearman_per_row_mean():
    a = np.array([[1.0, 2.0, 3.0, 4.0], [0.1, 0.2, 0.3, 0.4]])
    assert np.isclose(probe.spearman(a, a * 10), 1.0)
    assert np.isclose(probe.spearman(a, -a), -1.0)
    # row 1 fully agrees, row 2 swaps the middle pair: rho = 1 - 6*2/(4*15) = 0.8
    b = np.array([[1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.2, 0.4]])
    assert np.isclose(probe.spearman(a, b), (1.0 + 0.8) / 2)


def test_hit1_counts_ties_against_the_target():
    scores = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.1, 0.2, 0.3]])
    assert probe.hit1(scores, np.array([0, 0, 2])) == 2 / 3  # row 2: a tie at the top is a miss


def test_follows_popularity_and_cf():
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    pop = np.array([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0]])  # candidate 0 is the most popular in both rows
    cf = np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])  # the CF model prefers candidate 2
    f = probe.follows(scores, pop, cf)
    assert f["agree_pop"] == 0.5 and f["agree_cf"] == 0.5
    assert np.isclose(f["rho_pop"], 0.0) and np.isclose(f["rho_cf"], 0.0)  # rows +1 and -1
    assert probe.follows(cf, pop, cf)["agree_cf"] == 1.0


def test_train_split_rows_are_stage2s_own_examples(tmp_path):
    """--split train: the seeded trained users, each with the history, target and candidate order that
    Stage-2 trained on (the last training item after the history; the test and validation items held out)."""
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from allmrec.config import load_config
    from pipelines.common import training_users
    (tmp_path / "data").mkdir()
    seqs = [list(range(1 + u, 9 + u)) for u in range(10)]  # 8 items per user: train = the first 6
    pq.write_table(pa.table({"user": list(range(10)), "seq": seqs}), tmp_path / "data" / "sequences.parquet")
    cfg = load_config(None, [f"run_dir={tmp_path}", "stage2.max_users=6"])
    prep = SimpleNamespace(n_items=40, n_train_users=10)
    rows = probe.train_rows(cfg, prep, 4)
    assert len(rows) == 4 and set(rows["user"]) <= training_users(cfg, prep, 6)
    for u, h, t, c, negs in zip(rows["user"], rows["history"], rows["target"], rows["cands"], rows["negatives"]):
        assert list(h) == seqs[u][:5] and t == seqs[u][5]  # history -> the last training item
        assert len(c) == cfg.data.n_negatives + 1 and t in c and not set(negs) & set(seqs[u])
