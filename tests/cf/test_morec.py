"""MoRec: SASRec over a trainable projection of frozen item text vectors (allmrec/cf/morec.py)."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from allmrec.cf import CF_MODELS, MoRec, SASRec, build_cf_model, load_cf_model
from allmrec.cf.data import TrainBatches, pad_left
from allmrec.cf.morec import load_text_embeddings
from allmrec.cf.trainer import evaluate_candidates, train_epoch
from allmrec.metrics import summarize

N_ITEMS, N_USERS, D, L, TEXT_DIM = 40, 6, 16, 8, 48
CFG = {"hidden": D, "max_len": L, "dropout": 0.1, "num_blocks": 2, "num_heads": 2, "proj_hidden": 32}
HISTORIES = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def text_vectors(n_items=N_ITEMS, dim=TEXT_DIM, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(n_items + 1, dim, generator=g), dim=1)  # SBERT-like: unit norm
    t[0] = 0
    return t


def make(**over) -> MoRec:
    torch.manual_seed(0)
    return build_cf_model("morec", N_ITEMS, N_USERS, {**CFG, **over}, text_emb=text_vectors()).eval()


def seqs_tensor(histories=HISTORIES, max_len=L) -> torch.Tensor:
    return torch.from_numpy(pad_left(histories, max_len))


def test_registered_shapes_and_interface():
    assert CF_MODELS["morec"] is MoRec and issubclass(MoRec, SASRec)
    m = make()
    assert m.cfg["text_dim"] == TEXT_DIM and m.hidden == D
    E = m.item_embeddings()
    assert E.shape == (N_ITEMS + 1, D) and torch.all(E[0] == 0)
    seqs = seqs_tensor()
    x = m.user_representation(seqs)
    h = m.sequence_representations(seqs)
    assert x.shape == (4, D) and h.shape == (4, L, D)
    assert torch.allclose(h[:, -1], x, atol=1e-6) and torch.all(h[seqs == 0] == 0)
    items = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 40]])
    assert torch.allclose(m.score(x, items), (x[:, None, :] * E[items]).sum(-1), atol=1e-5)
    # the item table is not a free ID table: no parameter is shaped like one, only the frozen text buffer
    assert not any(p.shape[0] == N_ITEMS + 1 for p in m.parameters())
    assert m.text_embeddings().shape == (N_ITEMS + 1, TEXT_DIM) and not m.text_embeddings().requires_grad
    assert isinstance(make(proj_layers=1).item_emb.proj, torch.nn.Linear)


def test_item_table_is_a_function_of_the_text_vectors():
    m = make()
    E = m.item_embeddings().detach().clone()
    with torch.no_grad():
        m.item_emb.text[5] = torch.randn(TEXT_DIM)
    E2 = m.item_embeddings().detach()
    changed = (E2 != E).any(1)
    assert changed.tolist() == [i == 5 for i in range(N_ITEMS + 1)]
    with torch.no_grad():  # same text, same embedding, whatever the item id
        m.item_emb.text[9] = m.item_emb.text[3]
    E3 = m.item_embeddings()
    assert torch.equal(E3[9], E3[3])
    # and the user representation follows the text of the items in the history
    seqs = seqs_tensor([[1, 2, 3]])
    before = m.user_representation(seqs)
    with torch.no_grad():
        m.item_emb.text[2] += 0.5
    assert not torch.allclose(m.user_representation(seqs), before)


def test_one_projection_per_forward_and_gradients_reach_the_projection():
    m = make().train()
    calls = []
    m.item_emb.proj.register_forward_hook(lambda *_: calls.append(1))
    seq = seqs_tensor([h[:-1] if len(h) > 1 else h for h in HISTORIES])
    pos = seqs_tensor([h[1:] if len(h) > 1 else h for h in HISTORIES])
    batch = {"users": torch.arange(4), "seq": seq, "pos": pos, "neg": torch.where(pos != 0, 40 - pos % 5, 39)}
    loss = m.training_loss(batch)
    assert len(calls) == 1  # inputs, positives and negatives share one projected table
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.item_emb.proj.parameters())


def test_trains_on_a_tiny_markov_dataset():
    # each item is followed by item + 1 (mod 40) or item + 7: learnable only through the text projection
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(60):
        x = int(rng.integers(1, N_ITEMS + 1))
        s = [x]
        for _ in range(9):
            x = (x - 1 + (1 if rng.random() < 0.8 else 7)) % N_ITEMS + 1
            s.append(x)
        seqs.append(s)
    torch.manual_seed(0)
    model = build_cf_model("morec", N_ITEMS, len(seqs), {"hidden": 32, "max_len": 10, "dropout": 0.0,
                                                         "num_heads": 1, "proj_hidden": 64},
                           text_emb=text_vectors(dim=64))
    train = [s[:-1] for s in seqs]
    batches = TrainBatches(train, np.arange(len(seqs)), 10, N_ITEMS, 32, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    cands = np.array([[s[-1], *rng.choice(np.setdiff1d(np.arange(1, N_ITEMS + 1), s), 19, replace=False)]
                      for s in seqs])
    before = summarize(evaluate_candidates(model, train, None, cands))["hit@1"]
    losses = [train_epoch(model, batches, opt) for _ in range(40)]
    after = summarize(evaluate_candidates(model, train, None, cands))["hit@1"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert after > 0.6 and after > before + 0.3, (before, after)


def test_save_load_roundtrip_from_the_folder_alone(tmp_path):
    m = make()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.save(tmp_path / "cf")
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "cf" / "config.json").read_text())
    assert meta["name"] == "morec" and meta["cfg"]["text_dim"] == TEXT_DIM
    assert torch.equal(load_file(str(tmp_path / "cf" / "model.safetensors"))["item_emb.text"], text_vectors())
    loaded = load_cf_model(tmp_path / "cf")
    assert type(loaded) is MoRec and not loaded.training
    assert torch.equal(loaded.text_embeddings(), m.text_embeddings())
    seqs, items = seqs_tensor(), torch.randint(1, N_ITEMS + 1, (4, 20))
    assert torch.equal(loaded.score(loaded.user_representation(seqs), items),
                       m.score(m.user_representation(seqs), items))
    assert torch.equal(loaded.item_embeddings(), m.item_embeddings())


def test_clear_errors_without_or_with_bad_text_vectors(tmp_path):
    with pytest.raises(ValueError, match="allmrec encode"):
        build_cf_model("morec", N_ITEMS, N_USERS, CFG)
    with pytest.raises(ValueError, match=r"\(n_items \+ 1, dim\)"):
        build_cf_model("morec", N_ITEMS, N_USERS, CFG, text_emb=torch.zeros(N_ITEMS, TEXT_DIM))
    with pytest.raises(ValueError, match="text_dim"):
        build_cf_model("morec", N_ITEMS, N_USERS, {**CFG, "text_dim": 7}, text_emb=text_vectors())
    with pytest.raises(ValueError, match="NaN"):
        build_cf_model("morec", N_ITEMS, N_USERS, CFG, text_emb=text_vectors() * float("nan"))
    with pytest.raises(ValueError, match="proj_layers"):
        build_cf_model("morec", N_ITEMS, N_USERS, {**CFG, "proj_layers": 3}, text_emb=text_vectors())
    with pytest.raises(TypeError):  # other models take no text
        build_cf_model("sasrec", N_ITEMS, N_USERS, {"hidden": D}, text_emb=text_vectors())
    # built from a saved config but without its weights: refuses to run on the all-zero placeholder
    blank = MoRec(N_ITEMS, N_USERS, {**CFG, "text_dim": TEXT_DIM})
    with pytest.raises(ValueError, match="load its weights first"):
        blank.item_embeddings()
    with pytest.raises(ValueError, match="load its weights first"):
        blank.user_representation(seqs_tensor())
    blank.load_state_dict(make().state_dict())
    assert blank.item_embeddings().shape == (N_ITEMS + 1, D)


def _write_encode(folder, items, dim=5):
    """text_emb.parquet the way Ray writes it: a folder of part files, rows in no particular order."""
    path = folder / "text_emb.parquet"
    path.mkdir(parents=True)
    vecs = {int(i): np.full(dim, float(i), dtype=np.float32) for i in items}
    half = len(items) // 2
    for k, part in enumerate((items[half:], items[:half])):
        pq.write_table(pa.table({"item": pa.array(part, pa.int32()),
                                 "emb": pa.array([vecs[int(i)] for i in part], pa.list_(pa.float32()))}),
                       path / f"part-{k}.parquet")
    return folder


def test_load_text_embeddings(tmp_path):
    out = load_text_embeddings(_write_encode(tmp_path / "a", [3, 1, 2, 4]), 4)
    assert out.dtype == np.float32 and out.shape == (5, 5)
    assert out[:, 0].tolist() == [0, 1, 2, 3, 4]  # row i = item i, row 0 = padding zeros
    with pytest.raises(FileNotFoundError, match="allmrec encode"):
        load_text_embeddings(tmp_path / "missing", 4)
    with pytest.raises(ValueError, match="1 missing"):
        load_text_embeddings(_write_encode(tmp_path / "b", [1, 2, 4]), 4)
    with pytest.raises(ValueError, match="one vector per item"):
        load_text_embeddings(_write_encode(tmp_path / "c", [1, 2, 3, 4, 5]), 4)
