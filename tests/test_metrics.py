import math

import numpy as np
import pytest

from allmrec.metrics import hit_at_k, mrr, ndcg_at_k, paired_difference, ranks_from_scores, summarize

RANKS = [0, 1, 5, 20]


def test_hand_computed_values():
    assert hit_at_k(RANKS, 1) == pytest.approx(0.25)
    assert hit_at_k(RANKS, 5) == pytest.approx(0.5)  # rank 5 is the 6th place: not in the top 5
    assert hit_at_k(RANKS, 10) == pytest.approx(0.75)
    assert ndcg_at_k(RANKS, 1) == pytest.approx(0.25)
    # (1/log2(2) + 1/log2(3) + 1/log2(7) + 0) / 4
    assert ndcg_at_k(RANKS, 10) == pytest.approx((1 + 0.6309297536 + 0.3562071871) / 4)
    assert ndcg_at_k(RANKS, 5) == pytest.approx((1 + 0.6309297536) / 4)
    assert mrr(RANKS) == pytest.approx((1 + 1 / 2 + 1 / 6 + 1 / 21) / 4)


def test_summarize_keys_and_values():
    s = summarize(np.array(RANKS), ks=(1, 3, 5, 10))
    assert set(s) == {"hit@1", "hit@3", "hit@5", "hit@10", "ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "mrr", "n"}
    assert s["n"] == 4 and s["hit@1"] == 0.25 and s["hit@3"] == 0.5
    assert s["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert s["mrr"] == pytest.approx(mrr(RANKS))


def test_perfect_and_worst():
    assert summarize([0, 0, 0])["ndcg@10"] == 1.0
    assert summarize([19, 19])["hit@10"] == 0.0


def test_ranks_from_scores_ties_count_against_positive():
    scores = np.array([[3.0, 1.0, 2.0],    # best
                       [1.0, 2.0, 3.0],    # worst
                       [2.0, 2.0, 1.0],    # tie with one negative -> rank 1
                       [5.0, 5.0, 5.0]])   # all equal -> worst
    assert ranks_from_scores(scores).tolist() == [0, 2, 1, 2]


@pytest.mark.parametrize("bad", [[], [-1, 0], [[0, 1]], [0.5]])
def test_bad_ranks_rejected(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_bad_k_and_nan_scores_rejected():
    with pytest.raises(ValueError):
        hit_at_k([0], 0)
    with pytest.raises(ValueError):
        ranks_from_scores(np.array([[np.nan, 1.0]]))


def test_paired_difference_known_case():
    a = [1, 1, 0, 0, 1]  # a hits cases 0, 1, 4; b hits 1, 2
    b = [0, 1, 1, 0, 0]
    r = paired_difference(a, b)
    d = np.array([1, 0, -1, 0, 1])
    assert r["diff"] == pytest.approx(0.2) and (r["wins"], r["losses"], r["n"]) == (2, 1, 5)
    assert r["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(5))
    # models that agree on every case differ by 0 with no error, whatever their own Hit@1's error
    assert paired_difference(a, a) == {"diff": 0.0, "se": 0.0, "wins": 0, "losses": 0, "n": 5}
    with pytest.raises(ValueError, match="paired hits"):
        paired_difference([1, 0], [1])
