"""Item vectors fed to the Stage-2 item projector."""
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
