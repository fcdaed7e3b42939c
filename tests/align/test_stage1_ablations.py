"""Stage-1 ablation switches (paper Table 5): each removes exactly its term, they are validated, they change
the Stage-1 fingerprint, and frozen SBERT stays frozen through a training step."""
import json

import pytest
import torch

from allmrec.align.sbert import PACKAGED_SBERT, TextEncoder, load_sbert
from allmrec.align.stage1 import Stage1Aligner, Stage1Model, stage1_losses
from allmrec.config import ConfigError, Stage1Config, load_config

TERMS = ("matching", "item_recon", "text_recon", "rec")
ALPHA, BETA = 0.3, 0.7
# ablation -> the terms it removes from the total
ABLATIONS = {
    "w/o matching": ({"use_matching": False}, {"matching"}),
    "w/o item recon": ({"alpha": 0.0}, {"item_recon"}),
    "w/o text recon": ({"beta": 0.0}, {"text_recon"}),
    "w/o both recon": ({"use_recon": False}, {"item_recon", "text_recon"}),
    "w/o rec": ({"use_rec": False}, {"rec"}),
}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _inputs():
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(6, k, generator=g) for k in (5, 5, 7, 5))  # E_pos, E_neg, Q_pos, x_u


def _grads(al: Stage1Aligner, loss: torch.Tensor) -> list[torch.Tensor]:
    params = list(al.parameters())
    gs = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]


@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_each_switch_removes_exactly_its_term(name):
    kwargs, removed = ABLATIONS[name]
    al = Stage1Aligner(5, 7, 3)
    args = _inputs()
    full = stage1_losses(al, *args, alpha=ALPHA, beta=BETA)
    out = stage1_losses(al, *args, **{"alpha": ALPHA, "beta": BETA, **kwargs})
    weight = {"matching": 1.0, "item_recon": ALPHA, "text_recon": BETA, "rec": 1.0}
    kept = [k for k in TERMS if k not in removed]
    # every part is still reported with the same value; the removed ones detached
    for k in TERMS:
        assert out[k].item() == pytest.approx(full[k].item(), abs=1e-7)
        assert out[k].requires_grad == (k not in removed), k
    want = sum(weight[k] * full[k] for k in kept)
    assert out["total"].item() == pytest.approx(want.item(), abs=1e-6)
    assert out["total"].item() == pytest.approx(
        full["total"].item() - sum(weight[k] * full[k].item() for k in removed), abs=1e-6)
    # the gradient is that of the kept terms alone: the removed term contributes nothing
    for g_out, g_want in zip(_grads(al, out["total"]), _grads(al, want)):
        assert torch.allclose(g_out, g_want, atol=1e-7)
    for k in removed:  # and that term on its own does move the weights (the check above can fail)
        assert any(g.abs().sum() > 0 for g in _grads(al, full[k]))


def test_total_needs_at_least_one_term():
    al, args = Stage1Aligner(5, 7, 3), _inputs()
    for kwargs in ({"use_matching": False, "use_rec": False, "use_recon": False},
                   {"use_matching": False, "use_rec": False, "alpha": 0.0, "beta": 0.0}):
        with pytest.raises(ValueError, match="at least one"):
            stage1_losses(al, *args, **kwargs)
    with pytest.raises(ValueError, match="alpha and beta"):
        stage1_losses(al, *args, alpha=-0.1)
    only_text = stage1_losses(al, *args, alpha=0.0, use_matching=False, use_rec=False)
    assert only_text["total"].item() == pytest.approx(0.5 * only_text["text_recon"].item(), abs=1e-7)


def test_config_validates_the_switches():
    cfg = load_config(None, ["stage1.use_matching=false", "stage1.alpha=0", "stage1.sbert_trainable_layers=0"])
    assert not cfg.stage1.use_matching and cfg.stage1.alpha == 0.0 and cfg.stage1.sbert_trainable_layers == 0
    for bad, msg in [(["stage1.alpha=-0.5"], "alpha"), (["stage1.beta=nan"], "beta"),
                     (["stage1.use_matching=false", "stage1.use_rec=false", "stage1.use_recon=false"], "every loss"),
                     (["stage1.use_matching=false", "stage1.use_rec=false", "stage1.alpha=0", "stage1.beta=0"],
                      "every loss"),
                     (["stage1.sbert_trainable_layers=-2"], "sbert_trainable_layers"),
                     (["stage1.latent=0"], "latent"), (["stage1.lr=0"], "lr")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, bad)


def test_switches_change_the_stage1_fingerprint(tmp_path, monkeypatch):
    """pipelines/stage1.py fingerprints cfg.stage1: a changed switch means a retrain, never a stale reuse."""
    import pipelines.stage1 as job

    from allmrec.artifacts import CF_CONFIG, CF_WEIGHTS
    for part in ("data", "cf/sasrec"):
        (tmp_path / part).mkdir(parents=True)
        (tmp_path / part / "manifest.json").write_text(json.dumps({"fingerprint": f"fp-{part}"}))
    # the job reads the CF model's files for their checksum: any bytes will do here
    (tmp_path / "cf/sasrec" / CF_CONFIG).write_text(json.dumps({"name": "sasrec"}))
    (tmp_path / "cf/sasrec" / CF_WEIGHTS).write_bytes(b"weights")
    seen = []
    # the job computes its fingerprint, then asks whether the output is up to date: stop it right there
    monkeypatch.setattr(job, "up_to_date", lambda name, out_dir, fp, force: seen.append(fp) or True)
    variants = [[], ["stage1.use_matching=false"], ["stage1.alpha=0"], ["stage1.beta=0"], ["stage1.use_recon=false"],
                ["stage1.use_rec=false"], ["stage1.sbert_trainable_layers=0"]]
    for ov in variants:
        job.stage1(load_config(None, [f"run_dir={tmp_path}", *ov]))
    job.stage1(load_config(None, [f"run_dir={tmp_path}", "stage1.num_workers=2"]))  # resources only
    assert len(seen) == len(variants) + 1 and len(set(seen[:-1])) == len(variants)
    assert seen[-1] == seen[0]


@pytest.fixture(scope="module")
def sbert():
    return load_sbert(PACKAGED_SBERT)


TEXTS = ["", "Title: The Matrix, Description: a hacker learns the truth", "Title: Toy Story",
         "Title: Alien, Description: in space no one can hear you scream", "Title: Heat", "short text"]


def _model(st, layers: int, **cfg) -> Stage1Model:
    enc = TextEncoder(st, trainable_layers=layers)
    enc.pretokenize(TEXTS, max_len=32)
    enc.precompute_lower(4)
    return Stage1Model.from_config(Stage1Config(latent=8, **cfg), cf_dim=6, text_encoder=enc)


def _step(model: Stage1Model) -> dict:
    g = torch.Generator().manual_seed(0)
    E = torch.randn(len(TEXTS), 6, generator=g)
    pos, neg = torch.tensor([1, 2, 3, 5]), torch.tensor([4, 5, 4, 2])
    batch = {"pos_items": pos, "neg_items": neg, "x_u": torch.randn(4, 6, generator=g),
             "E_pos": E[pos], "E_neg": E[neg]}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    out = model(batch)
    opt.zero_grad()
    out["total"].backward()
    opt.step()
    return out


def test_frozen_sbert_is_unchanged_by_a_step_and_fine_tuned_sbert_moves(sbert):
    model = _model(sbert, 0)
    assert all(n.startswith("aligner.") for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.text_encoder.named_parameters()}
    aligner_before = model.aligner.text_enc[0].weight.detach().clone()
    _step(model)
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.text_encoder.named_parameters())
    assert not torch.equal(model.aligner.text_enc[0].weight, aligner_before)  # the aligner did learn

    model = _model(sbert, 1)  # the same step with the top layer trainable does change SBERT
    top = model.text_encoder.backbone.encoder.layer[5].output.dense.weight
    top_before = top.detach().clone()
    _step(model)
    assert not torch.equal(top, top_before)


def test_stage1_model_follows_the_config_switches(sbert):
    model = _model(sbert, 0, use_rec=False, beta=0.0)
    assert not model.use_rec and model.beta == 0.0
    out = _step(model)
    assert not out["rec"].requires_grad and not out["text_recon"].requires_grad
    want = out["matching"] + model.alpha * out["item_recon"]
    assert out["total"].item() == pytest.approx(want.item(), abs=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        _model(sbert, 0, use_matching=False, use_rec=False, use_recon=False)
