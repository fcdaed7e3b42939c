"""Stage-2: the loss is the target-title cross-entropy, and only the projector learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

from allmrec.config import DomainConfig
from allmrec.llm.prompt import IGNORE, PromptBuilder, embed_with_soft_tokens, input_embedding_scale, positions_from_mask
from allmrec.llm.stage2 import Stage2Projector, soft_prompt_embeds, stage2_loss

MOVIES = DomainConfig("watched", "movie", "movies")
D_USER, D_ITEM = 6, 5


def tiny_gemma3(vocab: int, softcap: float | None = 30.0, seed: int = 0) -> Gemma3ForCausalLM:
    """A tiny random Gemma3: it scales its input embeddings (x sqrt(32)) and, here, soft-caps its logits
    (Gemma3-270M does not; Gemma 2 does) so the head-at-targets path must reproduce both."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                           max_position_embeddings=512, sliding_window=16, layer_types=["sliding_attention",
                           "full_attention"], final_logit_softcapping=softcap, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, initializer_range=0.2)
    return Gemma3ForCausalLM(cfg).float().requires_grad_(False).eval()


def tiny_qwen2(vocab: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    return Qwen2ForCausalLM(cfg).float().requires_grad_(False).eval()


@pytest.fixture(params=["opt", "llama", "gemma3", "qwen2"])
def any_arch(request, tokenizers_by_style, make_tiny):
    """(style, frozen tiny model, tokenizer) for the four architectures the project loads."""
    style = "opt" if request.param == "opt" else "llama"
    tok, vocab = tokenizers_by_style[style]
    make = {"gemma3": tiny_gemma3, "qwen2": tiny_qwen2}.get(request.param, lambda v: make_tiny(request.param, v))
    return request.param, make(vocab), tok


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


def test_head_at_targets_gives_the_full_forwards_loss_and_gradients(any_arch):
    """The LM head applied only to the hidden states at the answer positions (Stage-2's and TALLRec's
    loss) equals the plain causal-LM loss over all logits of the model's own forward, and so do the
    projector's gradients, for OPT, Llama, Gemma3 (scaled embeddings, soft-capped logits) and Qwen2."""
    _, llm, tok = any_arch
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    assert (batch["labels"][0] != IGNORE).sum() != (batch["labels"][1] != IGNORE).sum()  # padded targets too
    torch.manual_seed(1)
    proj = Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)
    for w in (1.0, 3.0):
        proj.zero_grad()
        loss = stage2_loss(llm, proj, batch, user, items, pb.placeholders, choice_weight=w)
        loss.backward()
        got = [p.grad.clone() for p in proj.parameters()]
        proj.zero_grad()
        ce = _reference_loss(llm, soft_prompt_embeds(llm, proj, batch["input_ids"], pb.placeholders, user, items),
                             batch, reduction="none")
        valid = batch["labels"][:, 1:] != IGNORE
        weight = valid.float() * torch.where(valid.long().cumsum(1) == 1, w, 1.0)
        ref = (ce * weight).sum() / weight.sum()
        ref.backward()
        assert torch.allclose(loss.detach(), ref.detach(), atol=1e-5), (w, loss, ref)
        for g, p in zip(got, proj.parameters()):
            assert g.abs().sum() > 0 and torch.allclose(g, p.grad, atol=1e-6, rtol=1e-4)


def test_head_at_targets_matches_logits_to_keep_in_bf16(tokenizers_by_style, make_tiny):
    """In bf16 (the CPU default) the gathered-head loss agrees with `logits_to_keep` to bf16 precision."""
    tok, vocab = tokenizers_by_style["llama"]
    llm = make_tiny("llama", vocab).to(torch.bfloat16)
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    proj = Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)
    with torch.no_grad():
        loss = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
        embeds = soft_prompt_embeds(llm, proj, batch["input_ids"], pb.placeholders, user, items)
        mask = batch["attention_mask"]
        n = int((batch["labels"] != IGNORE).sum(1).max())
        logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                     logits_to_keep=n + 1).logits[:, :-1].float()
        ref = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, -n:], ignore_index=IGNORE)
    assert loss.dtype == torch.float32 and abs(float(loss) - float(ref)) < 2e-2 * float(ref), (loss, ref)


def test_soft_tokens_are_fed_on_a_scaling_embeddings_level(tokenizers_by_style, make_tiny):
    """Gemma scales its embedding rows (x sqrt(hidden)) inside the embedding module: a soft token equal
    to a word's table row must reach the LLM exactly as that word does; a non-scaling model is unchanged."""
    tok, vocab = tokenizers_by_style["llama"]
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, _, _ = _batch(pb)
    ids, ph = batch["input_ids"], pb.placeholders
    g = tiny_gemma3(vocab)
    module = g.get_input_embeddings()
    assert input_embedding_scale(module) == pytest.approx(32 ** 0.5)
    assert input_embedding_scale(make_tiny("llama", vocab).get_input_embeddings()) is None
    words = torch.tensor([5, 17, 42, 7, 99, 3])  # the words the soft tokens stand for
    n_items = (ids == ph.item_id).sum(1)
    item_words = torch.stack([words.roll(b)[: int(n_items.max())] for b in range(2)])
    user_words = torch.tensor([11, 12])
    real = ids.clone()  # the same prompt with real words in the soft-token slots
    for b in range(2):
        real[b, ids[b] == ph.item_id] = item_words[b, : int(n_items[b])]
        real[b, ids[b] == ph.user_id] = user_words[b]
    table = module.weight
    with torch.no_grad():
        spliced = embed_with_soft_tokens(g, ids, ph, table[user_words], table[item_words])
        assert torch.equal(spliced, module(real))
        mask = batch["attention_mask"]
        pos = positions_from_mask(mask)
        assert torch.equal(g(inputs_embeds=spliced, attention_mask=mask, position_ids=pos).logits,
                           g(input_ids=real, attention_mask=mask, position_ids=pos).logits)


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


def test_candidate_choice_loss_on_a_known_case():
    """The softmax over the candidates' distinct first tokens, by hand: a token shared by two candidates
    counts once, padded candidates (-1) not at all."""
    from allmrec.llm.stage2 import candidate_choice_loss
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 9.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    cands = torch.tensor([[1, 2, 2, 3], [0, 1, 2, -1]])
    got = candidate_choice_loss(logits, torch.tensor([2, 1]), cands)
    row0 = -torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), 0)[1]  # token 4 (logit 9) is no candidate
    row1 = -torch.log_softmax(torch.tensor([5.0, 0.0, 0.0]), 0)[1]
    assert torch.allclose(got, (row0 + row1) / 2)
    with pytest.raises(ValueError, match="does not start like"):
        candidate_choice_loss(logits, torch.tensor([4, 1]), cands)


def test_candidate_softmax_adds_the_choice_term_and_trains_the_projector(tiny):
    """stage2_loss(candidate_softmax=w) = the paper's loss + w x the candidate cross-entropy at each row's
    first answer position (checked against the model's full forward), and its gradient reaches the projector."""
    from allmrec.llm.stage2 import candidate_choice_loss
    llm, pb, batch, user, items, proj = _setup(tiny)
    firsts = [[pb.target_ids(t)[0] for t in c] for c in (["Heat (1995)", "Casino (1995)", "Jaws (1975)"],
                                                           ["Pulp Fiction (1994)", "Brazil (1985)"])]
    cand_first = torch.tensor([firsts[0], firsts[1] + [-1]])
    plain = stage2_loss(llm, proj, batch, user, items, pb.placeholders)
    mixed = stage2_loss(llm, proj, batch, user, items, pb.placeholders, candidate_softmax=2.0, cand_first=cand_first)
    with torch.no_grad():
        mask = batch["attention_mask"]
        emb = soft_prompt_embeds(llm, proj, batch["input_ids"], pb.placeholders, user, items)
        logits = llm(inputs_embeds=emb, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        lab = batch["labels"]
        at = [int((lab[b] != IGNORE).nonzero()[0]) - 1 for b in range(2)]  # the position predicting the first target
        first_logits = torch.stack([logits[b, at[b]] for b in range(2)])
        ref = candidate_choice_loss(first_logits, torch.tensor([firsts[0][0], firsts[1][0]]), cand_first)
    assert torch.allclose(mixed.detach() - plain.detach(), 2.0 * ref, atol=1e-4)
    if len(set(firsts[0])) == 1:  # the byte-level tokenizer starts every title with " ": nothing to choose
        assert float(ref) == 0.0
    else:
        assert float(ref) > 0
        proj.zero_grad()
        (mixed - plain).backward()
        assert any(float(p.grad.abs().sum()) > 0 for p in proj.parameters())
    with pytest.raises(ValueError, match="cand_first"):
        stage2_loss(llm, proj, batch, user, items, pb.placeholders, candidate_softmax=1.0)


@pytest.mark.parametrize("style", ["llama", "opt"])
def test_compiled_decoder_blocks_give_the_same_loss_and_gradients(style, tokenizers_by_style, make_tiny):
    """compile_layers: every decoder block compiled in place (the same parameter names), eager attention,
    and Stage-2's loss and projector gradients as the uncompiled model's, for Llama- and OPT-style models."""
    from allmrec.llm.loading import compile_layers, decoder_layers
    tok, vocab = tokenizers_by_style[style]
    ref_llm, llm = make_tiny(style, vocab), make_tiny(style, vocab)
    keys = list(llm.state_dict())
    assert compile_layers(llm) == len(decoder_layers(llm)) == 2
    assert list(llm.state_dict()) == keys and llm.config._attn_implementation == "eager"
    pb = PromptBuilder(tok, MOVIES, 8)
    batch, user, items = _batch(pb)
    torch.manual_seed(1)
    proj = Stage2Projector(D_USER, D_ITEM, llm.config.hidden_size)
    grads = []
    for model in (ref_llm, llm):
        proj.zero_grad()
        loss = stage2_loss(model, proj, batch, user, items, pb.placeholders)
        loss.backward()
        grads.append((float(loss), [p.grad.clone() for p in proj.parameters()]))
    assert abs(grads[0][0] - grads[1][0]) < 1e-4
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


def test_compile_is_refused_with_partitioned_weights():
    from allmrec.config import ConfigError, load_config
    assert load_config(None, ["stage2.zero_stage=0"]).stage2.compiles()
    assert not load_config(None, ["stage2.zero_stage=3"]).stage2.compiles()  # auto: off under ZeRO-3
    assert not load_config(None, ["stage2.zero_stage=0", "stage2.compile=never"]).stage2.compiles()
    with pytest.raises(ConfigError, match="compile=always"):
        load_config(None, ["stage2.zero_stage=3", "stage2.compile=always"])
    for args, want in (([], True), (["tallrec.zero_stage=3"], False), (["stage2.compile=never"], False)):
        cfg = load_config(None, args)  # TALLRec: ZeRO-0 by default, compiled unless stage2.compile=never
        assert cfg.tallrec.compiles(cfg.stage2) is want


def test_compiled_decoder_blocks_train_lora_adapters_like_the_plain_model(tokenizers_by_style, make_tiny):
    """TALLRec compiles the blocks after LoRA is injected: the same loss and adapter gradients."""
    from allmrec.llm.loading import compile_layers
    from allmrec.llm.lora import add_lora
    _, vocab = tokenizers_by_style["llama"]
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    runs = []
    for compiled in (False, True):
        llm = make_tiny("llama", vocab)
        torch.manual_seed(3)
        add_lora(llm, r=4, alpha=8.0, dropout=0.0)
        with torch.no_grad():  # B starts at zero; move every adapter so it changes the output
            for p in (p for p in llm.parameters() if p.requires_grad):
                p.normal_(0, 0.05)
        if compiled:
            compile_layers(llm)
        loss = llm(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((float(loss), {n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = runs
    assert abs(l0 - l1) < 1e-4 and g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert float(g0[n].abs().sum()) > 0 and torch.allclose(g0[n], g1[n], atol=1e-4, rtol=1e-3), n
