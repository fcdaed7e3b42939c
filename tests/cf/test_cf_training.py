"""CF data helpers, negative sampling, training and evaluation on tiny synthetic and real data."""
import json

import numpy as np
import pytest
import torch

from allmrec.cf import CF_MODELS, build_cf_model
from allmrec.cf.data import TrainBatches, make_train_arrays, pad_left, sample_negatives
from allmrec.cf.trainer import evaluate_candidates, fit, popularity_scores, score_candidates, train_epoch
from allmrec.metrics import ranks_from_scores, summarize


def model_inputs(name: str, n_items: int) -> dict:
    """MoRec projects its item table from text vectors. One-hot vectors stand in for SBERT's here (random
    ones carry no signal, so MoRec would have nothing to learn from on the real sample)."""
    if not getattr(CF_MODELS[name], "needs_text_embeddings", False):
        return {}
    text = torch.eye(n_items + 1)
    text[0, 0] = 0.0  # row 0 = padding
    return {"text_emb": text}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_pad_left():
    out = pad_left([[1, 2, 3], [4], [], [5, 6, 7, 8, 9]], 4)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4], [0, 0, 0, 0], [6, 7, 8, 9]]
    assert pad_left([], 3).shape == (0, 3)
    assert pad_left([np.array([3, 4], dtype=np.int32)], 3).tolist() == [[0, 3, 4]]
    with pytest.raises(ValueError):
        pad_left([[1, 0, 2]], 4)
    with pytest.raises(ValueError):
        pad_left([[1]], 0)


def test_make_train_arrays_shifts_and_drops_short_users():
    a = make_train_arrays([[1, 2, 3, 4], [5], [6, 7], [1, 2, 3, 4, 5, 6]], [10, 11, 12, 13], 3)
    assert a["users"].tolist() == [10, 12, 13]
    assert a["seq"].tolist() == [[1, 2, 3], [0, 0, 6], [3, 4, 5]]
    assert a["pos"].tolist() == [[2, 3, 4], [0, 0, 7], [4, 5, 6]]
    with pytest.raises(ValueError):
        make_train_arrays([[1, 2]], [0, 1], 3)


def test_sample_negatives_properties():
    rng = np.random.default_rng(0)
    n_items = 30
    histories = [list(rng.choice(np.arange(1, n_items + 1), size=k, replace=False)) for k in (1, 5, 15, 25, 29)]
    pos = np.ones((5, 200), dtype=np.int64)
    neg = sample_negatives(pos, histories, n_items, rng)
    assert neg.shape == pos.shape and neg.dtype == np.int64
    assert neg.min() >= 1 and neg.max() <= n_items
    for row, hist in zip(neg, histories):
        assert not set(row.tolist()) & set(hist)
    # the user who has seen 29 of 30 items can only get the last one (reached by the explicit fallback)
    assert set(neg[4].tolist()) == set(range(1, n_items + 1)) - set(histories[4])
    # uniform over the allowed items: every allowed item shows up for the 5-item user
    assert set(neg[1].tolist()) == set(range(1, n_items + 1)) - set(histories[1])
    # 1-D positions and seeding
    a = sample_negatives(np.ones(5, np.int64), histories, n_items, np.random.default_rng(7))
    b = sample_negatives(np.ones(5, np.int64), histories, n_items, np.random.default_rng(7))
    assert a.shape == (5,) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="all 3 items"):
        sample_negatives(np.ones((1, 2)), [[1, 2, 3]], 3, rng)
    with pytest.raises(ValueError):
        sample_negatives(np.ones((2, 2)), [[1]], 3, rng)


def test_train_batches_seeded_epochs_and_shards():
    seqs = [[i % 20 + 1, (i + 3) % 20 + 1, (i + 7) % 20 + 1] for i in range(23)] + [[1]]
    users = np.arange(len(seqs))
    tb = TrainBatches(seqs, users, 4, 20, 5, seed=3)
    e0, e1 = list(tb), list(tb)
    assert len(tb) == len(e0) == 5  # 23 usable users, batches of 5
    again = list(TrainBatches(seqs, users, 4, 20, 5, seed=3))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(e0, again) for k in x)
    assert not all(torch.equal(x["users"], y["users"]) for x, y in zip(e0, e1))
    for batch in e0:
        assert set(batch) == {"users", "seq", "pos", "neg"}
        assert all(v.dtype == torch.int64 for v in batch.values())
        for u, negs in zip(batch["users"].tolist(), batch["neg"].tolist()):
            assert 0 not in negs and not set(negs) & set(seqs[u])
    assert sorted(torch.cat([b["users"] for b in e0]).tolist()) == list(range(23))
    # ranks partition the same shuffle and run the same number of batches
    shards = [TrainBatches(seqs, users, 4, 20, 5, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([b["users"] for b in s]).tolist() for s in shards]
    assert len(shards[0]) == len(shards[1]) and len(seen[0]) == len(seen[1]) == 11
    assert not set(seen[0]) & set(seen[1])
    with pytest.raises(ValueError):
        TrainBatches([[1], [2]], [0, 1], 4, 20, 5)


def _toy(n_users=8, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [list(rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(4, 9)), replace=False))
            for _ in range(n_users)]
    cands = np.array([[s[-1], *rng.choice(np.setdiff1d(np.arange(1, n_items + 1), s), 19, replace=False)]
                      for s in seqs])
    return seqs, cands


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_each_model_overfits_a_handful_of_sequences(name):
    torch.manual_seed(0)
    seqs, cands = _toy()
    model = build_cf_model(name, 40, len(seqs), {"hidden": 32, "max_len": 10, "dropout": 0.0, "num_heads": 1},
                           **model_inputs(name, 40))
    batches = TrainBatches(seqs, np.arange(len(seqs)), 10, 40, 8, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = summarize(evaluate_candidates(model, [s[:-1] for s in seqs], np.arange(8), cands))["hit@1"]
    losses = [train_epoch(model, batches, opt) for _ in range(150)]
    ranks = evaluate_candidates(model, [s[:-1] for s in seqs], np.arange(8), cands)
    assert losses[-1] < 0.3 * losses[0]
    assert summarize(ranks)["hit@1"] == 1.0, (before, ranks)


@pytest.mark.shared_data
@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_loss_decreases_on_real_sample(name, shared_data):
    path = shared_data / "amazon-scientific" / "Scientific.inter.json"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    raw = json.loads(path.read_text())
    seqs = [raw[k] for k in sorted(raw, key=int)[:200]]
    ids = {it: j + 1 for j, it in enumerate(sorted({i for s in seqs for i in s}))}
    seqs = [[ids[i] for i in s] for s in seqs]
    train = [s[:-2] for s in seqs]
    torch.manual_seed(0)
    model = build_cf_model(name, len(ids), len(seqs), {"hidden": 32, "max_len": 20, "dropout": 0.2},
                           **model_inputs(name, len(ids)))
    batches = TrainBatches(train, np.arange(len(seqs)), 20, len(ids), 64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = [train_epoch(model, batches, opt) for _ in range(5)]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.01, losses


def test_evaluate_candidates_batched_matches_rows_and_restores_mode():
    torch.manual_seed(0)
    seqs, cands = _toy()
    model = build_cf_model("sasrec", 40, len(seqs), {"hidden": 16, "max_len": 6, "dropout": 0.5})
    model.train()
    hist = [s[:-1] for s in seqs]
    scores = score_candidates(model, hist, np.arange(8), cands, batch_size=3)
    assert model.training  # put back as it was
    assert scores.shape == (8, 20) and scores.dtype == np.float32
    one_by_one = np.concatenate([score_candidates(model, hist[i:i + 1], [i], cands[i:i + 1]) for i in range(8)])
    assert np.allclose(scores, one_by_one, atol=1e-5)  # eval mode: no dropout noise, rows independent
    assert np.array_equal(evaluate_candidates(model, hist, None, cands, batch_size=5), ranks_from_scores(scores))
    with pytest.raises(ValueError):
        evaluate_candidates(model, hist[:3], None, cands)
    with pytest.raises(ValueError):
        evaluate_candidates(model, hist, None, np.zeros((8, 20), dtype=np.int64))


def test_popularity_baseline():
    pop = popularity_scores([[1, 2, 2], [2, 3]], 4)
    assert pop.tolist() == [-np.inf, 1.0, 3.0, 1.0, 0.0]
    ranks = ranks_from_scores(pop[np.array([[2, 1, 3], [1, 2, 4], [4, 1, 3]])])
    assert ranks.tolist() == [0, 1, 2]  # item 1 ties item 3: the tie counts against the positive
    with pytest.raises(ValueError):
        popularity_scores([[5]], 4)


def test_fit_early_stops_and_restores_best():
    torch.manual_seed(0)
    seqs, cands = _toy()
    model = build_cf_model("gru4rec", 40, len(seqs), {"hidden": 16, "max_len": 10, "dropout": 0.0})
    batches = TrainBatches([s[:-1] for s in seqs], np.arange(8), 10, 40, 8, seed=0, histories=seqs)
    valid = ([s[:-1] for s in seqs], np.arange(8), cands)
    records = fit(model, batches, torch.optim.Adam(model.parameters(), lr=1e-2), epochs=200, valid=valid,
                  patience=3)
    assert len(records) < 200 and all("ndcg@10" in r for r in records)
    best = max(r["ndcg@10"] for r in records)
    assert summarize(evaluate_candidates(model, *valid))["ndcg@10"] == pytest.approx(best)
