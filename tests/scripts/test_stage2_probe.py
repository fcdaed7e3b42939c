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
