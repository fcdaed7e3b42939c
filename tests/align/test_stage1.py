"""Stage-1 losses, the collapse that reconstruction prevents, and the trainable Stage1Model."""
import math

import pytest
import torch
import torch.nn.functional as F

from allmrec.align.sbert import PACKAGED_SBERT, TextEncoder, load_sbert
from allmrec.align.stage1 import (Stage1Aligner, Stage1Model, joint_embeddings, stage1_losses,
                                  text_joint_embeddings)
from allmrec.config import Stage1Config


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def identity_aligner() -> Stage1Aligner:
    al = Stage1Aligner(2, 2, 2)
    with torch.no_grad():
        for lin in (al.item_enc[0], al.item_dec, al.text_enc[0], al.text_dec):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    return al


def test_losses_by_hand():
    # identity weights: e = sigmoid(E), E_hat = sigmoid(E); sigmoid(ln 3) = 3/4, sigmoid(0) = 1/2
    l3 = math.log(3)
    E_pos, E_neg = torch.tensor([[0.0, 0.0]]), torch.tensor([[l3, -l3]])
    Q_pos, x_u = torch.tensor([[0.0, l3]]), torch.tensor([[2.0, 0.0]])
    out = stage1_losses(identity_aligner(), E_pos, E_neg, Q_pos, x_u, alpha=0.5, beta=0.2)
    matching = ((0.5 - 0.5) ** 2 + (0.5 - 0.75) ** 2) / 2
    item_recon = (0.25 + 0.25 + (l3 - 0.75) ** 2 + (-l3 - 0.25) ** 2) / 4  # positives and negatives
    text_recon = ((0 - 0.5) ** 2 + (l3 - 0.75) ** 2) / 2
    rec = math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.5))  # logits 2*.5 (pos), 2*.75 (neg)
    assert out["matching"].item() == pytest.approx(matching, abs=1e-6)
    assert out["item_recon"].item() == pytest.approx(item_recon, abs=1e-6)
    assert out["text_recon"].item() == pytest.approx(text_recon, abs=1e-6)
    assert out["rec"].item() == pytest.approx(rec, abs=1e-6)
    total = matching + 0.5 * item_recon + 0.2 * text_recon + rec
    assert out["total"].item() == pytest.approx(total, abs=1e-6)


def test_rec_loss_is_bce_on_dot_products():
    al = Stage1Aligner(5, 7, 3)
    E_pos, E_neg, Q, x_u = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 7), torch.randn(4, 5)
    W1, b1, W2, b2 = al.item_enc[0].weight, al.item_enc[0].bias, al.item_dec.weight, al.item_dec.bias
    dec = lambda E: torch.sigmoid(E @ W1.T + b1) @ W2.T + b2  # noqa: E731
    pos, neg = (x_u * dec(E_pos)).sum(1), (x_u * dec(E_neg)).sum(1)
    want = F.binary_cross_entropy_with_logits(pos, torch.ones(4)) \
        + F.binary_cross_entropy_with_logits(neg, torch.zeros(4))
    assert stage1_losses(al, E_pos, E_neg, Q, x_u)["rec"].item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(joint_embeddings(al, E_pos), torch.sigmoid(E_pos @ W1.T + b1))
    assert text_joint_embeddings(al, Q).shape == (4, 3)


def test_switches_choose_the_terms_of_total():
    al = Stage1Aligner(5, 7, 3)
    args = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 7), torch.randn(4, 5)
    full = stage1_losses(al, *args, alpha=0.3, beta=0.7)
    for m, r, c in [(True, False, False), (False, True, False), (False, False, True), (True, True, False)]:
        out = stage1_losses(al, *args, alpha=0.3, beta=0.7, use_matching=m, use_recon=r, use_rec=c)
        want = m * full["matching"] + r * (0.3 * full["item_recon"] + 0.7 * full["text_recon"]) + c * full["rec"]
        assert out["total"].item() == pytest.approx(want.item(), abs=1e-6)
        assert out["matching"].requires_grad == m and out["rec"].requires_grad == c
        assert out["item_recon"].requires_grad == r
    with pytest.raises(ValueError, match="at least one"):
        stage1_losses(al, *args, use_matching=False, use_recon=False, use_rec=False)
    with pytest.raises(ValueError, match="Q_pos"):
        stage1_losses(al, args[0], args[1], torch.randn(4, 6), args[3])
    with pytest.raises(ValueError, match="E_neg"):
        stage1_losses(al, args[0], torch.randn(3, 5), args[2], args[3])


def _train_aligner(use_recon: bool, steps: int = 300):
    # more items (256) than input dims (16 + 24): no exact non-constant match of E and Q exists,
    # so matching alone is minimised only by mapping everything to one point
    g = torch.Generator().manual_seed(0)
    E, Q = torch.randn(256, 16, generator=g), torch.randn(256, 24, generator=g)
    al = Stage1Aligner(16, 24, 32)
    opt = torch.optim.Adam(al.parameters(), lr=1e-2)

    def spread() -> tuple[float, float]:
        with torch.no_grad():  # variance across items, averaged over latent dims
            return joint_embeddings(al, E).var(0).mean().item(), text_joint_embeddings(al, Q).var(0).mean().item()

    v0 = spread()
    for _ in range(steps):
        out = stage1_losses(al, E, E.roll(1, 0), Q, torch.zeros(256, 16), 1.0, 1.0,
                            use_matching=True, use_recon=use_recon, use_rec=False)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
    return v0, spread(), out


def test_matching_alone_collapses_and_reconstruction_prevents_it():
    v0, (ve, vq), out = _train_aligner(use_recon=False)
    assert out["matching"].item() < 1e-6  # "perfect" alignment ...
    assert ve < 1e-4 * v0[0] and vq < 1e-4 * v0[1]  # ... by sending every item/text to one point
    assert out["item_recon"].item() > 0.5  # the collapsed code has forgotten E (var(E) = 1)

    v0, (ve, vq), out = _train_aligner(use_recon=True)
    assert ve > 0.3 * v0[0] and vq > 0.3 * v0[1]  # joint embeddings stay spread
    assert out["item_recon"].item() < 0.05 and out["text_recon"].item() < 0.05


def test_total_loss_decreases_on_random_data():
    g = torch.Generator().manual_seed(1)
    n, d, dim = 64, 8, 12
    E, Q, X = torch.randn(n, d, generator=g), torch.randn(n, dim, generator=g), torch.randn(n, d, generator=g)
    neg = torch.randperm(n, generator=g)
    al = Stage1Aligner(d, dim, 16)
    opt = torch.optim.Adam(al.parameters(), lr=1e-2)
    hist = []
    for _ in range(150):
        out = stage1_losses(al, E, E[neg], Q, X, 0.5, 0.5)
        opt.zero_grad()
        out["total"].backward()
        opt.step()
        hist.append(out["total"].item())
    assert hist[-1] < 0.6 * hist[0]
    assert sum(hist[-10:]) < sum(hist[:10])


TEXTS = ["", "Title: The Matrix, Description: a hacker learns the truth", "Title: Toy Story",
         "Title: Alien, Description: in space no one can hear you scream", "Title: Heat", "short text"]


def test_stage1_model_trains_aligner_and_top_sbert_layer_only():
    enc = TextEncoder(load_sbert(PACKAGED_SBERT), trainable_layers=1)
    enc.pretokenize(TEXTS, max_len=32)
    enc.precompute_lower(4)
    cfg = Stage1Config(latent=16)
    model = Stage1Model.from_config(cfg, cf_dim=10, text_encoder=enc)
    assert model.aligner.text_dim == 384 and model.aligner.latent == 16
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("aligner.", "text_encoder.backbone.encoder.layer.5.")) for n in names)

    g = torch.Generator().manual_seed(0)
    item_emb = torch.randn(len(TEXTS), 10, generator=g)  # stands in for the frozen CF model
    pos, neg = torch.tensor([1, 2, 3, 1]), torch.tensor([4, 5, 4, 2])
    batch = {"pos_items": pos, "neg_items": neg, "x_u": torch.randn(4, 10, generator=g),
             "E_pos": item_emb[pos], "E_neg": item_emb[neg]}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    lower = enc.backbone.encoder.layer[4].output.dense.weight.clone()
    top = enc.backbone.encoder.layer[5].output.dense.weight.clone()
    model.train()
    hist = []
    for _ in range(15):
        out = model(batch)
        assert set(out) == {"total", "matching", "item_recon", "text_recon", "rec"}
        opt.zero_grad()
        out["total"].backward()
        assert enc.backbone.encoder.layer[5].output.dense.weight.grad is not None
        opt.step()
        hist.append(out["total"].item())
    assert hist[-1] < hist[0]
    assert torch.equal(enc.backbone.encoder.layer[4].output.dense.weight, lower)
    assert not torch.equal(enc.backbone.encoder.layer[5].output.dense.weight, top)

    with pytest.raises(ValueError, match="lacks"):
        model({"pos_items": pos})
    with pytest.raises(ValueError, match="item ids"):
        model({**batch, "neg_items": torch.tensor([9, 9, 9, 9])})
    with pytest.raises(ValueError, match="text_dim"):
        Stage1Model(Stage1Aligner(10, 100, 16), enc)
