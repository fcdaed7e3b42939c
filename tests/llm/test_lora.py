"""TALLRec's LoRA: only the adapters learn on Stage-2's loss, and saved adapters reproduce the model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from allmrec.config import DomainConfig
from allmrec.llm.lora import add_lora, default_target_modules, load_lora, lora_state, save_lora
from allmrec.llm.prompt import IGNORE, PromptBuilder, positions_from_mask
from allmrec.llm.stage2 import soft_prompt_embeds, stage2_loss

MOVIES = DomainConfig("watched", "movie", "movies")
EXAMPLES = [(["The Matrix (1999)", "Toy Story (1995)", "Fargo (1996)"], ["Heat (1995)", "Casino (1995)", "Jaws (1975)"],
             "Heat (1995)"),
            (["Alien (1979)"], ["Pulp Fiction (1994)", "Brazil (1985)"], "Pulp Fiction (1994)")]


def _batch(tok):
    """The LLM-Only prompt (no soft tokens): what TALLRec trains on."""
    pb = PromptBuilder(tok, MOVIES, 8, use_user_token=False, item_tokens=False)
    return pb, pb.collate([pb.build(h, c, t) for h, c, t in EXAMPLES])


def _logits(llm, pb, batch):
    with torch.no_grad():
        emb = soft_prompt_embeds(llm, None, batch["input_ids"], pb.placeholders)
        return llm(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits.float()


def _train(llm, pb, batch, steps: int = 15) -> list[float]:
    opt = torch.optim.AdamW([p for p in llm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    llm.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = stage2_loss(llm, None, batch, None, None, pb.placeholders)  # Stage-2's loss, no projector
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_only_lora_weights_learn_and_the_loss_goes_down(tiny):
    style, llm, tok = tiny
    pb, batch = _batch(tok)
    before = {k: v.clone() for k, v in llm.state_dict().items()}
    model = add_lora(llm, r=4, alpha=8, dropout=0.05)
    assert model is llm  # in place: still the *ForCausalLM class ranking and generation use
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # 2 layers x (q_proj, v_proj) x (A, B)
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable), trainable
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {"q_proj", "v_proj"}
    losses = _train(model, pb, batch)
    assert losses[-1] < 0.85 * losses[0], losses
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert p.grad is None, n
        assert torch.equal(p, before[n.replace(".base_layer", "")]), n  # base weights bit for bit
    assert all(float(v.abs().sum()) > 0 for k, v in lora_state(model).items() if ".lora_B." in k)


def test_tallrec_loss_at_the_targets_equals_the_full_forward_with_its_gradients(tiny):
    """TALLRec's loss (Stage-2's, no projector; LM head on the answer positions only) equals the plain
    causal-LM loss over every logit of the LoRA model's own forward, and so do the adapters' gradients."""
    _, llm, tok = tiny
    pb, batch = _batch(tok)
    model = add_lora(llm, r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B, so that every adapter weight gets a gradient
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    loss = stage2_loss(model, None, batch, None, None, pb.placeholders)
    got = torch.autograd.grad(loss, params)
    mask = batch["attention_mask"]
    emb = soft_prompt_embeds(model, None, batch["input_ids"], pb.placeholders)
    logits = model(inputs_embeds=emb, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    ref = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE)
    want = torch.autograd.grad(ref, params)
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0 and torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_saved_adapters_reproduce_the_logits_merged_or_not(tiny, make_tiny, tokenizers_by_style, tmp_path):
    style, llm, tok = tiny
    pb, batch = _batch(tok)
    base = _logits(llm, pb, batch)
    model = add_lora(llm, r=4, alpha=8, dropout=0.0)
    assert torch.equal(_logits(model, pb, batch), base)  # B = 0: a fresh adapter changes nothing
    _train(model, pb, batch, steps=5)
    model.eval()
    want = _logits(model, pb, batch)
    assert not torch.allclose(want, base, atol=1e-3)
    path = save_lora(lora_state(model), tmp_path / "lora.safetensors", meta={"r": 4})
    cfg = SimpleNamespace(lora_r=4, lora_alpha=8, target_modules=[])  # targets read off the saved names
    fresh = make_tiny(style, tokenizers_by_style[style][1])
    loaded = load_lora(fresh, path, cfg)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert torch.allclose(_logits(loaded, pb, batch), want, atol=1e-5)
    merged = load_lora(make_tiny(style, tokenizers_by_style[style][1]), lora_state(model), cfg, merge=True)
    assert torch.allclose(_logits(merged, pb, batch), want, atol=1e-4)


def test_adapters_stay_fp32_on_a_bf16_llm(make_tiny, tokenizers_by_style):
    tok, vocab = tokenizers_by_style["llama"]
    llm = make_tiny("llama", vocab).to(torch.bfloat16)
    model = add_lora(llm)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    pb, batch = _batch(tok)
    loss = stage2_loss(model, None, batch, None, None, pb.placeholders)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_bad_targets_and_mismatched_adapters_are_rejected(make_tiny, tokenizers_by_style):
    _, vocab = tokenizers_by_style["opt"]
    assert default_target_modules(make_tiny("opt", vocab)) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="none of the LoRA target modules.*linear layers are"):
        add_lora(make_tiny("opt", vocab), target_modules=["c_attn"])
    with pytest.raises(ValueError, match="r >= 1"):
        add_lora(make_tiny("opt", vocab), r=0)
    model = add_lora(make_tiny("opt", vocab), r=4, target_modules=["q_proj", "k_proj"])
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)
    state = lora_state(model)
    with pytest.raises(ValueError, match="rank"):
        load_lora(make_tiny("opt", vocab), state, SimpleNamespace(lora_r=8, lora_alpha=16, target_modules=[]))
    with pytest.raises(ValueError, match="do not fit this model"):  # saved on q,k; config asks for q,v
        load_lora(make_tiny("opt", vocab), state, SimpleNamespace(lora_r=4, lora_alpha=16,
                                                                   target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        load_lora(make_tiny("opt", vocab), {"w": torch.zeros(1)}, SimpleNamespace(lora_r=4, lora_alpha=16,
                                                                                  target_modules=[]))
