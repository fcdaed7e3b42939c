"""Item vectors fed to the Stage-2 item projector, and the prompt layout a projector is tied to."""
import numpy as np
import pytest

from allmrec.recommender import item_vector_table, standardize_items


def test_standardize_items_spreads_near_constant_vectors_and_keeps_padding_zero():
    rng = np.random.default_rng(0)
    e = 0.5 + 0.01 * rng.standard_normal((50, 8)).astype(np.float32)  # what a saturated sigmoid gives
    e[0] = 0.0
    z = standardize_items(e)
    assert np.allclose(z[1:].mean(0), 0, atol=1e-4) and np.allclose(z[1:].std(0), 1, atol=1e-3)
    assert (z[0] == 0).all()
    # an affine map per dimension: the order of items along every dimension is unchanged
    assert (np.argsort(z[1:, 3]) == np.argsort(e[1:, 3])).all()


def test_item_vector_table_variants():
    e = np.random.default_rng(1).random((10, 4), dtype=np.float32)
    assert item_vector_table("none", e, e, e) is None
    assert item_vector_table("joint", e, None, None).shape == (10, 4)
    r1, r2 = item_vector_table("random", e, None, None, seed=3), item_vector_table("random", e, None, None, seed=3)
    assert np.array_equal(r1, r2)
    with pytest.raises(ValueError, match="unknown item token variant"):
        item_vector_table("bogus", e, e, e)


def test_candidate_order_is_evaluations_seeded_permutation():
    from allmrec.recommender import candidate_order

    target, negs = 17, [np.int64(x) for x in (3, 99, 42, 8, 61, 5, 23)]
    a = candidate_order([target, *negs], 7, user=12)
    assert a == candidate_order([target, *negs], 7, user=12)       # same inputs, same order
    assert sorted(a) == sorted([target, *map(int, negs)])            # a permutation
    assert all(type(x) is int for x in a)                           # numpy ints come back as int (JSON-safe)
    # the stream evaluation has always used: default_rng([seed, user, 9]).shuffle([target, *negatives])
    ref = [target, *map(int, negs)]
    np.random.default_rng([7, 12, 9]).shuffle(ref)
    assert a == ref
    assert candidate_order([target, *negs], 7, user=13) != a        # another user, another order
    assert candidate_order([target, *negs], 8, user=12) != a        # another seed, another order
    # a user id wins over a history (the service passes the looked-up history too)
    assert candidate_order([target, *negs], 7, user=12, history=[1, 2]) == a


def test_candidate_order_of_an_anonymous_history():
    from allmrec.recommender import candidate_order

    cands = [1, 2, 5, 6, 7, 11, 13, "new-1"]
    a = candidate_order(cands, 0, history=[3, 9, 4])
    assert a == candidate_order(list(cands), 0, history=[3, 9, 4]) and sorted(map(str, a)) == sorted(map(str, cands))
    ref = list(cands)
    np.random.default_rng([0, 9, 3, 9, 4]).shuffle(ref)
    assert a == ref
    assert candidate_order(cands, 0, history=[3, 9, 5]) != a        # depends on the history ...
    assert candidate_order(cands, 0, history=[9, 3, 4]) != a        # ... and on its order
    assert cands[-1] == "new-1"                                     # the input list is not shuffled in place
    with pytest.raises(ValueError, match="user id or an anonymous history"):
        candidate_order(cands, 0)
    with pytest.raises(ValueError, match=">= 0"):
        candidate_order(cands, 0, user=-1)


def test_a_projector_refuses_a_prompt_layout_it_was_not_trained_on(tmp_path):
    from safetensors.torch import save_file

    from allmrec.artifacts import PROJECTOR, load_projector
    from allmrec.config import load_config
    from allmrec.recommender import build_projector

    trained = load_config(None, ["stage2.item_token_position=before"])
    save_file(build_projector("joint", True, 4, 3, 8).state_dict(), tmp_path / PROJECTOR)
    trained.dump(tmp_path / "config.yaml")
    assert load_projector(tmp_path, trained, 4, 3, 8) is not None
    with pytest.raises(ValueError, match="item_token_position=before"):
        load_projector(tmp_path, load_config(None, []), 4, 3, 8)
    late_user = load_config(None, ["stage2.item_token_position=before", "stage2.user_token_position=after_history"])
    with pytest.raises(ValueError, match="user_token_position=start"):
        load_projector(tmp_path, late_user, 4, 3, 8)
    cf_order = load_config(None, ["stage2.item_token_position=before", "stage2.candidate_order=cf"])
    with pytest.raises(ValueError, match="candidate_order=seeded"):
        load_projector(tmp_path, cf_order, 4, 3, 8)
    (tmp_path / "config.yaml").write_text("seed: 1\n")  # written before the setting existed: the default
    assert load_projector(tmp_path, load_config(None, []), 4, 3, 8) is not None
    # a variant without the user token (allmrec_no_user) is in the CF order only with order_baselines
    no_user = tmp_path / "no_user"
    no_user.mkdir()
    save_file(build_projector("joint", False, 4, 3, 8).state_dict(), no_user / PROJECTOR)
    in_cf = load_config(None, ["stage2.use_user_token=false", "stage2.candidate_order=cf", "stage2.order_baselines=true"])
    seeded = load_config(None, ["stage2.use_user_token=false"])
    in_cf.dump(no_user / "config.yaml")  # trained in the CF order
    assert load_projector(no_user, in_cf, 4, 3, 8) is not None
    with pytest.raises(ValueError, match="candidate_order=cf, not seeded: set stage2.order_baselines=true"):
        load_projector(no_user, seeded, 4, 3, 8)
    seeded.dump(no_user / "config.yaml")
    with pytest.raises(ValueError, match="candidate_order=seeded, not cf: set stage2.order_baselines=false"):
        load_projector(no_user, in_cf, 4, 3, 8)
