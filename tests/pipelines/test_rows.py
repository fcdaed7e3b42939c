"""Stage-2's next-title examples (pipelines/rows.py): the paper's one per user, and several per user."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.rows import next_title_examples


def _block(n_users: int = 40, n_items: int = 200, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    seqs = [rng.choice(np.arange(1, n_items + 1), int(rng.integers(3, 14)), replace=False).tolist()
            for _ in range(n_users)]
    return pa.table({"user": np.arange(n_users, dtype=np.int64), "seq": seqs})


def _rows(ex: dict) -> list[tuple]:
    return [(int(u), tuple(h.tolist()), tuple(c.tolist()), int(t))
            for u, h, c, t in zip(ex["user"], ex["hist"], ex["cands"], ex["target"])]


def test_one_example_per_user_is_history_to_last_training_item():
    block = _block()
    ex = next_title_examples(block, 200, 19, seed=7)
    seqs = dict(zip(block["user"].to_pylist(), block["seq"].to_pylist()))
    assert len(ex["user"]) == sum(len(s) - 2 >= 2 for s in seqs.values())
    for u, h, c, t in _rows(ex):
        train = seqs[u][:-2]
        assert t == train[-1] and list(h) == train[:-1] and t in c and len(set(c)) == 20
        assert not (set(c) - {t}) & set(seqs[u])  # negatives avoid the whole sequence (valid/test too)


def test_several_examples_per_user_add_earlier_targets_and_keep_the_first():
    block = _block()
    seqs = dict(zip(block["user"].to_pylist(), block["seq"].to_pylist()))
    one = {r[0]: r for r in _rows(next_title_examples(block, 200, 19, seed=7))}
    k3 = _rows(next_title_examples(block, 200, 19, seed=7, examples_per_user=3))
    assert k3 == _rows(next_title_examples(block, 200, 19, seed=7, examples_per_user=3))  # seeded
    assert k3 != _rows(next_title_examples(block, 200, 19, seed=8, examples_per_user=3))
    for u in one:
        mine = [r for r in k3 if r[0] == u]
        train = seqs[u][:-2]
        assert len(mine) == min(3, len(train) - 1)  # capped by the earlier positions the user has
        assert mine[-1] == one[u]  # the paper's example, unchanged, comes last
        pos = [train.index(r[3]) for r in mine]
        assert pos == sorted(set(pos)) and pos[0] >= 1  # distinct targets in sequence order, never position 0
        for (_, h, c, t), p in zip(mine, pos):
            assert list(h) == train[:p] and t in c and not (set(c) - {t}) & set(seqs[u])
    with pytest.raises(ValueError, match="examples_per_user"):
        next_title_examples(block, 200, 19, seed=7, examples_per_user=0)


def test_heldout_target_trains_on_the_validation_item_never_the_test_item():
    block = _block()
    seqs = dict(zip(block["user"].to_pylist(), block["seq"].to_pylist()))
    paper = {r[0]: r for r in _rows(next_title_examples(block, 200, 19, seed=7))}
    held = _rows(next_title_examples(block, 200, 19, seed=7, heldout_target=True))
    assert {r[0] for r in held} == {u for u, s in seqs.items() if len(s) - 1 >= 2}  # one more user each can
    for u, h, c, t in held:
        s = seqs[u]
        assert t == s[-2] and list(h) == s[:-2]  # the whole training part -> the validation item
        assert t in c and len(set(c)) == 20 and not (set(c) - {t}) & set(s)
        if u in paper:
            assert t != paper[u][3] and list(h) != list(paper[u][1])  # another example than the paper's
    k3 = _rows(next_title_examples(block, 200, 19, seed=7, examples_per_user=3, heldout_target=True))
    for u in {r[0] for r in k3}:
        mine = [r for r in k3 if r[0] == u]
        part = seqs[u][:-1]
        assert mine[-1][3] == seqs[u][-2] and all(r[3] != seqs[u][-1] for r in mine)  # never the test item
        pos = [part.index(r[3]) for r in mine]
        assert pos == sorted(set(pos)) and pos[0] >= 1 and all(list(r[1]) == part[:p] for r, p in zip(mine, pos))


def test_heldout_target_is_its_own_projector_and_leaves_old_fingerprints():
    from allmrec.config import load_config
    from pipelines.stage2 import _fingerprinted

    assert "heldout_target" not in _fingerprinted(load_config(None, []))
    assert _fingerprinted(load_config(None, ["stage2.heldout_target=true"]))["heldout_target"] is True


def test_the_training_seed_varies_stage2_and_keeps_the_run_seed_and_old_fingerprints():
    from allmrec.config import ConfigError, load_config
    from pipelines.stage2 import _fingerprinted

    base = load_config(None, [])
    assert base.train_seed() == base.seed and "seed" not in _fingerprinted(base)  # earlier runs stay up to date
    other = load_config(None, ["stage2.seed=1"])
    assert other.train_seed() == 1 and other.seed == base.seed  # data, splits and evaluation unchanged
    assert _fingerprinted(other)["seed"] == 1  # another projector, trained again
    rows = [_rows(next_title_examples(_block(), 200, 19, seed=c.train_seed())) for c in (base, other)]
    assert rows[0] != rows[1]  # other training negatives
    with pytest.raises(ConfigError, match="stage2.seed"):
        load_config(None, ["stage2.seed=-1"])


def test_epoch_batches_plain_and_bucketed_by_length():
    from pipelines.rows import epoch_batches

    order = np.random.default_rng(0).permutation(50)
    plain = epoch_batches(order, 4)
    assert [b.tolist() for b in plain] == [order[i:i + 4].tolist() for i in range(0, 50, 4)]  # the paper's batches

    lengths = np.random.default_rng(1).integers(200, 420, 50)
    b1 = epoch_batches(order, 4, lengths, window=4, rng=np.random.default_rng(7))
    b2 = epoch_batches(order, 4, lengths, window=4, rng=np.random.default_rng(7))
    assert [b.tolist() for b in b1] == [b.tolist() for b in b2]  # seeded
    assert len(b1) == len(plain) == 13 and sorted(np.concatenate(b1).tolist()) == list(range(50))  # every row once
    # each batch comes from one window of 16 rows of the order, sorted by length: less padding per batch
    windows = {int(j): i // 16 for i, j in enumerate(order)}
    assert all(len({windows[int(j)] for j in b}) == 1 for b in b1)
    pad = lambda bs: sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in bs)
    assert pad(b1) < pad(plain) / 2
    with pytest.raises(ValueError, match="lengths"):
        epoch_batches(order, 4, None, window=4)
    with pytest.raises(ValueError, match="window"):
        epoch_batches(order, 4, lengths, window=-1, rng=np.random.default_rng(0))
