"""Stage-2: the loss is the target-title cross-entropy, and only the projector learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import allmrec.llm.prompt as prompt_mod
from allmrec.config import DomainConfig
from allmrec.llm.prompt import IGNORE, PromptBuilder, positions_from_mask
from allmrec.llm.stage2 import Stage2Projector, soft_prompt_embeds, stage2_loss

MOVIES = DomainConfig("watched", "movie", "movies")
D_USER, D_ITEM = 6, 5


def _batch(pb: PromptBuilder, seed: int = 0):
    examples = [
        (["The Matrix (1999)", "Toy Story (1995)", "Fargo (1996)"], ["Heat (1995)", "Casino (1995)", "Jaws (1975)"],
         "Heat (1995)"),
        (["Alien (1979)"], ["Pulp Fiction (1994)", "Brazil (1985)"], "Pulp Fiction (1994)"),
    ]
    batch = pb.collate([pb.build(h, c, t) for h, c, t in examples])
    g = torch.Generator().manual_seed(seed)
    user = torch.randn(2, D_USER, generator=g)
    items = torch.randn(2, int(batch["n_item_slots"].max()), D_ITEM, generator=g)
    return batch, user, items


def _setup(tiny):
    """(llm, prompt builder, batch, user reps, item vectors, fresh projector) on the tiny model."""
    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    return llm, pb, batch, user, items, Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)


def _reference_loss(llm, embeds, batch, reduction: str = "mean"):
    """Plain full-sequence causal-LM loss on the same embeddings (all logits, shifted labels);
    reduction="none": (B, T-1) per position."""
    mask = batch["attention_mask"]
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE,
                           reduction=reduction)


def test_loss_matches_full_logits_reference_and_fallback(tiny, monkeypatch):
    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    proj = Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)
    loss = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
    with torch.no_grad():
        ref = _reference_loss(llm, soft_prompt_embeds(llm, proj, batch["input_ids"], pb.placeholders, user, items),
                              batch)
    assert torch.allclose(loss.detach(), ref, atol=1e-5), (loss, ref)
    # architectures without `logits_to_keep`: backbone + lm_head on the kept positions only
    monkeypatch.setattr(prompt_mod, "supports_logits_to_keep", lambda llm: False)
    fallback = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
    assert torch.allclose(fallback.detach(), ref, atol=1e-5)


def test_left_padding_does_not_change_a_rows_loss(tiny):
    """Each row alone vs. the padded pair: same per-token losses (positions ignore the padding)."""
    llm, pb, batch, user, items, proj = _setup(tiny)
    with torch.no_grad():
        both = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
        parts, counts = [], []
        for b in range(2):
            keep = batch["attention_mask"][b].bool()
            one = {k: v[b:b + 1, keep] for k, v in batch.items() if k != "n_item_slots"}
            parts.append(stage2_loss(llm, proj, one, user[b:b + 1], items[b:b + 1], pb.placeholders))
            counts.append(int((one["labels"] != IGNORE).sum()))
    weighted = sum(p * c for p, c in zip(parts, counts)) / sum(counts)
    assert torch.allclose(both, weighted, atol=1e-5), (both, weighted)


def test_only_the_projector_learns_and_loss_goes_down(tiny):
    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    torch.manual_seed(0)
    proj = Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)
    before_llm = {k: v.clone() for k, v in llm.state_dict().items()}
    before_proj = {k: v.clone() for k, v in proj.state_dict().items()}
    opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for name, p in llm.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before_llm[name]), name  # bit for bit
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())
    assert any(not torch.equal(v, before_proj[k]) for k, v in proj.state_dict().items())
    assert losses[-1] < 0.85 * losses[0], losses


def test_llm_only_and_no_user_variants(tiny):
    _, llm, tok = tiny
    H = llm.config.hidden_size
    pb = PromptBuilder(tok, MOVIES, 8, use_user_token=False)
    batch, _, items = _batch(pb)
    proj = Stage2Projector(None, D_ITEM, H)
    assert proj.user_proj is None
    loss = stage2_loss(llm, proj, batch, None, items, pb.placeholders)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="no user MLP"):
        proj(torch.zeros(2, D_USER), None)
    only = PromptBuilder(tok, MOVIES, 8, use_user_token=False, item_tokens=False)
    batch, _, _ = _batch(only)
    emb = soft_prompt_embeds(llm, None, batch["input_ids"], only.placeholders)
    assert torch.equal(emb, llm.get_input_embeddings()(batch["input_ids"]))


def test_bad_batches_are_rejected(tiny):
    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    proj = Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)
    no_target = dict(batch, labels=torch.full_like(batch["labels"], IGNORE))
    with pytest.raises(ValueError, match="no target tokens"):
        stage2_loss(llm, proj, no_target, user, items, pb.placeholders)
    right_padded = dict(batch, labels=torch.roll(batch["labels"], -3, dims=1))
    with pytest.raises(ValueError, match="left padding"):
        stage2_loss(llm, proj, right_padded, user, items, pb.placeholders)
    with pytest.raises(ValueError):
        Stage2Projector(D_USER, D_ITEM, 0)


def test_choice_weight_weights_each_rows_first_target_token(tiny):
    """choice_weight=w: the first answer token of every row (where candidates compete) counts w times."""
    llm, pb, batch, user, items, proj = _setup(tiny)
    with torch.no_grad():
        plain = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
        weighted = stage2_loss(llm, proj, batch, user, items, pb.placeholders, choice_weight=5.0)
        ce = _reference_loss(llm, soft_prompt_embeds(llm, proj, batch["input_ids"], pb.placeholders, user, items),
                             batch, reduction="none")
    num = den = 0.0
    for b in range(2):  # by hand: each row's first labelled position weighs 5, the others 1
        pos = (batch["labels"][b, 1:] != IGNORE).nonzero().flatten().tolist()
        w = [5.0] + [1.0] * (len(pos) - 1)
        num += sum(wi * float(ce[b, p]) for wi, p in zip(w, pos))
        den += sum(w)
    assert abs(float(weighted) - num / den) < 1e-4
    assert not torch.allclose(plain, weighted)
    with pytest.raises(ValueError, match="choice_weight"):
        stage2_loss(llm, proj, batch, user, items, pb.placeholders, choice_weight=0.0)
