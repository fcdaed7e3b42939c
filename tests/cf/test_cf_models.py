"""CF model interface: shapes, masking/causality, NaN safety, registry, save/load, NCF's unseen users."""
import dataclasses
import json

import pytest
import torch

from allmrec.cf import CF_MODELS, CFModel, build_cf_model, load_cf_model
from allmrec.cf.data import pad_left
from allmrec.config import CFConfig

N_ITEMS, N_USERS, D, L = 40, 6, 16, 8
CFG = {"hidden": D, "max_len": L, "dropout": 0.1, "num_blocks": 2, "num_heads": 2}
SEQUENTIAL = ["sasrec", "gru4rec", "nextitnet"]
HISTORIES = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]


def model_inputs(name: str, n_items: int = N_ITEMS) -> dict:
    """Constructor inputs some models need: MoRec projects its item table from text vectors (random unit
    vectors stand in for SBERT's here)."""
    if not getattr(CF_MODELS[name], "needs_text_embeddings", False):
        return {}
    text = torch.nn.functional.normalize(torch.randn(n_items + 1, 24, generator=torch.Generator().manual_seed(1)), dim=1)
    return {"text_emb": text}


def make(name: str, **over) -> CFModel:
    torch.manual_seed(0)
    cfg = {k: v for k, v in {**CFG, **over}.items() if k in CF_MODELS[name].defaults}
    return build_cf_model(name, N_ITEMS, N_USERS, cfg, **model_inputs(name)).eval()


def seqs_tensor(histories=HISTORIES, max_len=L) -> torch.Tensor:
    return torch.from_numpy(pad_left(histories, max_len))


def batch_of(histories=HISTORIES):
    seq = seqs_tensor([h[:-1] if len(h) > 1 else h for h in histories])
    pos = seqs_tensor([h[1:] if len(h) > 1 else h for h in histories])
    neg = torch.where(pos != 0, 40 - pos % 5, torch.full_like(pos, 39))
    return {"users": torch.arange(len(histories)), "seq": seq, "pos": pos, "neg": neg}


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_shapes_and_loss(name):
    m = make(name)
    assert m.name == name and m.hidden == D and m.max_len == L
    E = m.item_embeddings()
    assert E.shape == (N_ITEMS + 1, D) and torch.all(E[0] == 0)
    seqs, users = seqs_tensor(), torch.arange(len(HISTORIES))
    x = m.user_representation(seqs, users)
    assert x.shape == (4, D)
    h = m.sequence_representations(seqs, users)
    assert h.shape == (4, L, D)
    assert torch.allclose(h[:, -1], x, atol=1e-6)
    assert torch.all(h[seqs == 0] == 0)
    items = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 40]])
    s = m.score(x, items)
    assert s.shape == (4, 3)
    assert torch.allclose(s, (x[:, None, :] * E[items]).sum(-1), atol=1e-5)
    m.train()
    loss = m.training_loss(batch_of())
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_padding_token_content_is_ignored(name):
    """Whatever the padding row holds, real positions see only real items."""
    m = make(name)
    seqs = seqs_tensor()
    ref = m.sequence_representations(seqs)
    with torch.no_grad():
        m.item_emb.weight[0].normal_(0, 5.0)
    assert torch.allclose(m.sequence_representations(seqs), ref, atol=1e-5)
    assert torch.all(m.item_embeddings()[0] == 0)


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_causality(name):
    m = make(name)
    seqs = seqs_tensor()
    ref = m.sequence_representations(seqs)
    for t in range(L - 1):
        changed = seqs.clone()
        later = changed[:, t + 1:]
        changed[:, t + 1:] = torch.where(later != 0, (later + 17) % N_ITEMS + 1, later)
        out = m.sequence_representations(changed)
        real = seqs[:, : t + 1] != 0
        assert torch.allclose(out[:, : t + 1][real], ref[:, : t + 1][real], atol=1e-5), f"position {t} saw the future"
        assert not torch.allclose(out[:, -1], ref[:, -1])  # the later items do matter


@pytest.mark.parametrize("name", ["gru4rec", "nextitnet"])
def test_amount_of_padding_does_not_matter(name):
    """Models without absolute positions give the same x_u however much left padding there is."""
    m = make(name)
    short_histories = [[3, 4, 5], [7], [11, 12, 13, 14, 15]]
    ref = m.user_representation(seqs_tensor(short_histories, L))
    assert torch.allclose(m.user_representation(seqs_tensor(short_histories, 5)), ref, atol=1e-5)
    m2 = build_cf_model(name, N_ITEMS, N_USERS, {"hidden": D, "max_len": 20, "dropout": 0.0})
    m2.load_state_dict(m.state_dict())
    m2.eval()
    assert torch.allclose(m2.user_representation(seqs_tensor(short_histories, 20)), ref, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_rows_are_independent(name):
    m = make(name)
    seqs, users = seqs_tensor(), torch.arange(4)
    together = m.user_representation(seqs, users)
    alone = torch.cat([m.user_representation(seqs[i:i + 1], users[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_no_nan_with_heavy_padding(name):
    m = make(name, dropout=0.3)
    seqs = torch.zeros(3, L, dtype=torch.long)
    seqs[0, -1] = 5  # one item
    seqs[1, -2:] = torch.tensor([6, 7])  # row 2: empty history
    for mode in (False, True):
        m.train(mode)
        h = m.sequence_representations(seqs)
        assert torch.isfinite(h).all()
        assert torch.isfinite(m.user_representation(seqs)).all()
    m.train()
    batch = {"users": torch.tensor([0, 1, 2]), "seq": seqs, "pos": torch.roll(seqs, -1, 1) * (seqs != 0),
             "neg": torch.full_like(seqs, 9)}
    batch["pos"][0, -1], batch["pos"][1, -1] = 8, 8
    loss = m.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_bad_inputs_are_rejected(name):
    m = make(name)
    with pytest.raises(ValueError, match="LEFT-padded"):
        m.user_representation(torch.tensor([[0, 3, 0, 4]]))
    with pytest.raises(ValueError, match="item ids"):
        m.user_representation(torch.tensor([[1, N_ITEMS + 1]]))
    with pytest.raises(ValueError):
        m.user_representation(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="lacks keys"):
        m.training_loss({"seq": seqs_tensor()})
    with pytest.raises(ValueError):
        m.score(torch.zeros(2, D), torch.ones(3, 4, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_longer_input_keeps_last_max_len(name):
    m = make(name)
    full = seqs_tensor([list(range(1, 21))], 20)
    assert torch.allclose(m.user_representation(full, torch.tensor([0])),
                          m.user_representation(full[:, -L:], torch.tensor([0])), atol=1e-6)


def test_registry_builds_from_config_and_rejects_unknown():
    cf = dataclasses.asdict(CFConfig())  # the whole config section may be passed as is
    for name, cls in CF_MODELS.items():
        m = build_cf_model(name, N_ITEMS, N_USERS, cf, **model_inputs(name))
        assert type(m) is cls and m.hidden == cf["hidden"] and m.max_len == cf["max_len"]
    assert set(CF_MODELS) == {"sasrec", "gru4rec", "nextitnet", "ncf", "morec"}
    with pytest.raises(ValueError, match="gru4rec.*morec.*ncf.*nextitnet.*sasrec"):
        build_cf_model("bert4rec", N_ITEMS, N_USERS, {})
    with pytest.raises(ValueError, match="hiden"):
        build_cf_model("sasrec", N_ITEMS, N_USERS, {"hiden": 8})
    with pytest.raises(ValueError, match="num_heads"):
        build_cf_model("sasrec", N_ITEMS, N_USERS, {"hidden": 10, "num_heads": 3})
    with pytest.raises(ValueError, match="dropout"):
        build_cf_model("gru4rec", N_ITEMS, N_USERS, {"dropout": 1.5})


@pytest.mark.parametrize("name", sorted(CF_MODELS))
def test_save_load_roundtrip(name, tmp_path):
    m = make(name)
    with torch.no_grad():  # move weights away from init so the check means something
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        m.item_emb.weight[0].zero_()
    m.save(tmp_path / "cf")
    assert sorted(p.name for p in (tmp_path / "cf").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "cf" / "config.json").read_text())
    assert meta["name"] == name and meta["n_items"] == N_ITEMS and meta["n_users"] == N_USERS
    loaded = load_cf_model(tmp_path / "cf")
    assert type(loaded) is type(m) and not loaded.training
    seqs, users = seqs_tensor(), torch.tensor([0, 1, 2, 99])  # 99: unseen user for NCF
    items = torch.randint(1, N_ITEMS + 1, (4, 20))
    assert torch.equal(loaded.score(loaded.user_representation(seqs, users), items),
                       m.score(m.user_representation(seqs, users), items))
    other = "ncf" if name != "ncf" else "sasrec"
    with pytest.raises(ValueError, match="not a"):
        CF_MODELS[other].load(tmp_path / "cf")
    with pytest.raises(FileNotFoundError):
        load_cf_model(tmp_path / "missing")


def test_ncf_unseen_users_use_history_centroid():
    m = make("ncf")
    E = m.item_embeddings()
    seqs = seqs_tensor()
    centroid = torch.stack([E[h[-L:]].mean(0) for h in HISTORIES])
    assert torch.allclose(m.user_representation(seqs, None), centroid, atol=1e-6)
    mixed = m.user_representation(seqs, torch.tensor([1, N_USERS, -1, 3]))
    assert torch.allclose(mixed[0], m.user_emb.weight[1]) and torch.allclose(mixed[3], m.user_emb.weight[3])
    assert torch.allclose(mixed[1:3], centroid[1:3], atol=1e-6)
    # running centroid per position for unseen users; last column = x_u
    h = m.sequence_representations(seqs)
    assert torch.allclose(h[0, -2], E[[3, 4]].mean(0), atol=1e-6)
    empty = m.user_representation(torch.zeros(1, L, dtype=torch.long))
    assert torch.all(empty == 0)
