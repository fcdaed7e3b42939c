"""Candidate ranking over a shared KV cache, greedy generation, and exact title matching."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from allmrec.config import DomainConfig
from allmrec.llm.prompt import IGNORE, PromptBuilder, positions_from_mask
from allmrec.llm.ranking import generate_title, generate_titles, match_candidate, rank_candidates
from allmrec.llm.stage2 import soft_prompt_embeds

MOVIES = DomainConfig("watched", "movie", "movies")
ALL_TITLES = ["The Matrix (1999)", "Toy Story (1995)", "Heat (1995)", "Casino (1995)", "Pulp Fiction (1994)",
              "Fargo (1996)", "Alien (1979)", "Jaws (1975)", "Brazil (1985)", "Amelie (2001)"]
CANDS = ["Heat (1995)", "Casino (1995)", "Pulp Fiction (1994)", "Alien (1979)", "Jaws (1975)", "Brazil (1985)"]


def _prompts(pb: PromptBuilder, llm, histories, cands):
    batch = pb.collate([pb.build(h, c) for h, c in zip(histories, cands)])
    return soft_prompt_embeds(llm, None, batch["input_ids"], pb.placeholders), batch["attention_mask"]


def _no_cache_score(llm, embeds, mask, cand_ids, length_norm):
    """Reference: one full forward over the unpadded prompt + candidate, no cache, no padding."""
    keep = mask.bool()
    cand = torch.tensor(cand_ids)
    x = torch.cat([embeds[keep], llm.get_input_embeddings()(cand)])[None]
    logits = llm(inputs_embeds=x).logits[0]
    n = len(cand_ids)
    lp = torch.log_softmax(logits[-n - 1:-1].double(), -1).gather(-1, cand[:, None]).sum()
    return (lp / n if length_norm else lp).item()


@pytest.mark.parametrize("length_norm", [True, False])
def test_cached_batched_ranking_equals_full_forward(tiny, length_norm):
    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 6, use_user_token=False, item_tokens=False)
    histories = [["The Matrix (1999)", "Toy Story (1995)", "Fargo (1996)"], ["Amelie (2001)"]]
    cands = [CANDS, CANDS[2:] + ["The Matrix (1999)", "Fargo (1996)"]]  # two users, prompts of different lengths
    embeds, mask = _prompts(pb, llm, histories, cands)
    cand_ids = [[pb.target_ids(t) for t in c] for c in cands]
    assert len({len(i) for i in cand_ids[0]}) > 1  # candidates of different lengths (right padding used)
    with torch.no_grad():
        scores = rank_candidates(llm, embeds, mask, cand_ids, length_norm=length_norm)
        assert scores.shape == (2, 6)
        for u in range(2):
            for j, ids in enumerate(cand_ids[u]):
                ref = _no_cache_score(llm, embeds[u], mask[u], ids, length_norm)
                assert abs(scores[u, j].item() - ref) < 1e-5, (u, j, scores[u, j].item(), ref)
        # one user, flat candidate list -> (n_cand,), same numbers as in the batch
        single = rank_candidates(llm, embeds[1:], mask[1:], cand_ids[1], length_norm=length_norm)
        assert single.shape == (6,) and torch.allclose(single, scores[1], atol=1e-5)
    # ragged candidate counts: -inf fills the missing ones
    ragged = rank_candidates(llm, embeds, mask, [cand_ids[0], cand_ids[1][:4]], length_norm=length_norm)
    assert ragged.shape == (2, 6) and torch.isinf(ragged[1, 4:]).all() and torch.allclose(ragged[1, :4], scores[1, :4])
    with pytest.raises(ValueError, match="candidates for 1 users but prompts for 2"):
        rank_candidates(llm, embeds, mask, cand_ids[0])


def _overfit(llm, pb, examples, steps=150):
    """Unfreeze the tiny LLM and teach it: prompt -> this continuation (ids, ending as given)."""
    enc = []
    for hist, cands, cont in examples:
        e = pb.build(hist, cands)
        e.input_ids += cont
        e.labels += cont
        enc.append(e)
    batch = pb.collate(enc)
    llm.requires_grad_(True).train()
    opt = torch.optim.Adam(llm.parameters(), lr=1e-2)
    mask = batch["attention_mask"]
    for _ in range(steps):
        opt.zero_grad()
        logits = llm(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE)
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    llm.requires_grad_(False).eval()
    return loss.item()


def test_planted_title_ranks_first_and_is_generated(tiny):
    style, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 8, use_user_token=False, item_tokens=False)
    h1, h2 = ["The Matrix (1999)", "Toy Story (1995)"], ["Amelie (2001)"]
    # prompt 1 -> " Pulp Fiction (1994)</s>"; prompt 2 -> " Casino (1995)\n Heat ..." (newline stops generation)
    newline = tok("\n", add_special_tokens=False).input_ids
    examples = [(h1, CANDS, pb.target_ids("Pulp Fiction (1994)")),
                (h2, CANDS, pb.title_ids("Casino (1995)") + newline + pb.target_ids("Heat (1995)"))]
    final = _overfit(llm, pb, examples)
    assert final < 0.05, final
    embeds, mask = _prompts(pb, llm, [h1, h2], [CANDS, CANDS])
    with torch.no_grad():
        scores = rank_candidates(llm, embeds, mask, [[pb.target_ids(c) for c in CANDS]] * 2)
    assert scores[0].argmax().item() == CANDS.index("Pulp Fiction (1994)")
    gens = generate_titles(llm, embeds, mask, tok, max_new_tokens=20)
    assert gens[0] == "Pulp Fiction (1994)"
    if style == "opt":  # the llama-style test tokenizer has no newline token (it maps "\n" to <unk>)
        assert gens[1] == "Casino (1995)"
    assert match_candidate(gens[0], [pb.shown_title(c) for c in CANDS]) == CANDS.index("Pulp Fiction (1994)")
    assert generate_title(llm, embeds[:1], mask[:1], tok, 20) == gens[0]  # no padding: same answer
    with pytest.raises(ValueError, match="one prompt"):
        generate_title(llm, embeds, mask, tok, 20)


def test_match_candidate_is_exact_after_normalization():
    cands = ["The Matrix (1999)", "Heat (1995)", "Toy Story (1995)"]
    for g in ["The Matrix (1999)", '"the matrix (1999)".', "  THE   MATRIX (1999) ", "\u201cThe Matrix (1999)\u201d",
              "Ｔｈｅ Ｍａｔｒｉｘ (1999)"]:
        assert match_candidate(g, cands) == 0, g
    assert match_candidate("Heat (1995)!", cands) == 1
    assert match_candidate("The Matrix (1999), Heat (1995)", cands) is None  # two titles: not a hit
    assert match_candidate("The Matrix", cands) is None  # a prefix is not the title
    assert match_candidate("", cands) is None
    assert match_candidate("Heat (1995)", ["Heat (1995)", "heat (1995)."]) is None  # ambiguous


def test_absolute_positions_survive_left_padding(tokenizers_by_style):
    """GPT-2 counts positions from 0 per row unless told: left padding would shift a short prompt.
    (RoPE models are shift-invariant and OPT derives positions from the mask, so this is the case
    where explicit position ids matter.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, vocab = tokenizers_by_style["opt"]
    torch.manual_seed(0)
    llm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab + 8, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                     initializer_range=0.2)).requires_grad_(False).eval()
    pb = PromptBuilder(tok, MOVIES, 6, use_user_token=False, item_tokens=False)
    histories = [["The Matrix (1999)", "Toy Story (1995)", "Fargo (1996)"], ["Amelie (2001)"]]
    embeds, mask = _prompts(pb, llm, histories, [CANDS, CANDS])
    cand_ids = [pb.target_ids(t) for t in CANDS]
    with torch.no_grad():
        scores = rank_candidates(llm, embeds, mask, [cand_ids, cand_ids], length_norm=False)
        for j, ids in enumerate(cand_ids):
            assert abs(scores[1, j].item() - _no_cache_score(llm, embeds[1], mask[1], ids, False)) < 1e-5


def _recommender(tok, llm, seed=0):
    """An A-LLMRec recommender over the test titles: random projector, random item vectors, user token."""
    from allmrec.recommender import LLMRecommender, build_projector
    torch.manual_seed(seed)
    H = llm.config.hidden_size
    proj = build_projector("joint", True, 8, 6, H).eval()
    vecs = np.random.default_rng(seed).standard_normal((len(ALL_TITLES) + 1, 6)).astype(np.float32)
    return LLMRecommender(llm, tok, ["", *ALL_TITLES], MOVIES, projector=proj, item_vectors=vecs, use_user_token=True,
                          history_len=5, max_title_tokens=8)


def _examples(n, seed=0):
    from allmrec.recommender import Example
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        items = rng.permutation(np.arange(1, len(ALL_TITLES) + 1)).tolist()
        h = int(rng.integers(1, 5))  # histories of different lengths: the old batch was left-padded
        out.append(Example(rng.standard_normal(8).astype(np.float32), items[:h], items[h:h + 5]))
    return out


@pytest.mark.parametrize("style", ["llama", "opt"])
def test_scores_do_not_depend_on_the_batch(tokenizers_by_style, style):
    """bf16: one example alone, twice in a batch, and among 7 others gets the same scores (issue 19: the
    batched path differed by up to 0.06). A wider model than `tiny`, so the matrix kernels reduce over
    hundreds of terms, as in a real LLM."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    tok, vocab = tokenizers_by_style[style]
    torch.manual_seed(0)
    if style == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
        llm = LlamaForCausalLM(cfg)
    else:
        cfg = OPTConfig(vocab_size=vocab + 8, hidden_size=256, word_embed_proj_dim=256, ffn_dim=768,
                        num_hidden_layers=2, num_attention_heads=4, init_std=0.1, dropout=0.0)
        llm = OPTForCausalLM(cfg)
    llm = llm.to(torch.bfloat16).requires_grad_(False).eval()
    rec = _recommender(tok, llm)
    exs = _examples(8)
    alone = rec.rank(exs[:1])[0]
    twice = rec.rank([exs[0], exs[0]])
    eight = rec.rank(exs)
    for other in (twice[0], twice[1], eight[0]):
        assert np.abs(other - alone).max() <= 1e-4
        assert np.argsort(-other, kind="stable").tolist() == np.argsort(-alone, kind="stable").tolist()
    assert np.abs(rec.rank(exs[::-1])[-1] - alone).max() <= 1e-4  # last of 8 instead of first
    assert np.isfinite(eight).all() and eight.shape == (8, 5)


def test_head_at_the_targets_equals_the_full_logits(tiny):
    """head_log_probs (gather the hidden states, then the LM head, in chunks) == log_softmax of the model's
    own full-sequence logits at the same positions (issue 23: the head at the targets only)."""
    from allmrec.llm.ranking import backbone, head_log_probs

    _, llm, _ = tiny
    ids = torch.randint(3, 200, (1, 17))
    with torch.no_grad():
        full = torch.log_softmax(llm(input_ids=ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        h = backbone(llm)(input_ids=ids).last_hidden_state[0, :-1]
        for chunk in (1, 5, 256):  # chunking changes nothing
            assert torch.allclose(head_log_probs(llm, h, ids[0, 1:], chunk=chunk), full, atol=1e-5)


def test_candidates_share_one_prompt_cache(tiny):
    """No per-candidate copy of the prompt's KV cache: every forward pass of a ranking has batch size 1 and
    the candidate pass feeds only the candidates' own tokens (memory grows with tokens, not C x prompt)."""
    from allmrec.llm.ranking import backbone

    _, llm, tok = tiny
    pb = PromptBuilder(tok, MOVIES, 6, use_user_token=False, item_tokens=False)
    embeds, mask = _prompts(pb, llm, [["The Matrix (1999)"], ["Amelie (2001)", "Heat (1995)"]], [CANDS, CANDS[:3]])
    cand_ids = [[pb.target_ids(t) for t in CANDS], [pb.target_ids(t) for t in CANDS[:3]]]
    shapes = []
    hook = backbone(llm).register_forward_hook(lambda m, a, kw, out: shapes.append(tuple(kw["inputs_embeds"].shape)),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            rank_candidates(llm, embeds, mask, cand_ids)
    finally:
        hook.remove()
    fed = [sum(len(c) - 1 for c in cands) for cands in cand_ids]
    assert [s[:2] for s in shapes] == [(1, int(mask[0].sum())), (1, fed[0]), (1, int(mask[1].sum())), (1, fed[1])]


@pytest.mark.slow
def test_packaged_llm_scores_do_not_depend_on_the_batch():
    """The packaged SmolLM2-135M in the served model's precision on this CPU (`llm_dtype=auto`: bf16 with
    AMX / AVX512-BF16, else fp32; emulated bf16 took 39 s here on a CPU without them): one example alone and
    among 7 others, 20 candidates each, same top-10 and scores within 1e-4 (the batched path of before
    differed by 0.07 in bf16)."""
    from allmrec.llm.loading import load_llm, resolve_dtype
    from allmrec.recommender import Example, LLMRecommender

    llm, tok = load_llm("packaged:SmolLM2-135M-Instruct", dtype=resolve_dtype("auto", "cpu"))
    rng = np.random.default_rng(0)
    words = "star night river dark king lost city love war blue house road fire dream ghost summer".split()
    titles = ["", *(" ".join(rng.choice(words, size=int(rng.integers(2, 6)))).title() + f" ({1950 + i % 50})"
                    for i in range(120))]
    rec = LLMRecommender(llm, tok, titles, MOVIES, projector=None, item_vectors=None, use_user_token=False)
    exs = [Example(None, rng.choice(np.arange(1, 121), int(rng.integers(3, 10)), replace=False).tolist(),
                   rng.choice(np.arange(1, 121), 20, replace=False).tolist()) for _ in range(8)]
    alone, eight = rec.rank(exs[:1])[0], rec.rank(exs)[0]
    assert np.abs(eight - alone).max() <= 1e-4
    assert np.argsort(-eight, kind="stable")[:10].tolist() == np.argsort(-alone, kind="stable")[:10].tolist()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompts_longer_than_a_sliding_window_rank_as_the_full_forward(tokenizers_by_style, attn):
    """Gemma3's sliding-window layers (window 16 here, 512 in Gemma3-270M) keep only the last window - 1
    tokens in their cache: a prompt + candidate longer than that is scored in one forward with a mask per
    layer type, and must equal the model's own full forward (which masks the window itself)."""
    from allmrec.llm.ranking import sliding_window
    from tests.llm.test_stage2 import tiny_gemma3
    tok, vocab = tokenizers_by_style["llama"]
    llm = tiny_gemma3(vocab + 8, softcap=None)
    llm.set_attn_implementation(attn)
    assert sliding_window(llm) == 16
    pb = PromptBuilder(tok, MOVIES, 6, use_user_token=False, item_tokens=False)
    histories = [["The Matrix (1999)", "Toy Story (1995)", "Fargo (1996)"], ["Amelie (2001)"]]
    cands = [CANDS, CANDS[2:] + ["The Matrix (1999)", "Fargo (1996)"]]
    embeds, mask = _prompts(pb, llm, histories, cands)
    assert int(mask.sum(1).min()) > 2 * 16  # far past the window
    cand_ids = [[pb.target_ids(t) for t in c] for c in cands]
    with torch.no_grad():
        scores = rank_candidates(llm, embeds, mask, cand_ids, length_norm=True)
        for u in range(2):
            for j, ids in enumerate(cand_ids[u]):
                ref = _no_cache_score(llm, embeds[u], mask[u], ids, True)
                assert abs(scores[u, j].item() - ref) < 1e-4, (u, j, scores[u, j].item(), ref)


def _cf_recommender(tok, llm, cf_items):
    """_recommender's model with candidate_order='cf' over the CF item table `cf_items`."""
    from allmrec.recommender import LLMRecommender
    base = _recommender(tok, llm)
    return LLMRecommender(llm, tok, base.titles, MOVIES, projector=base.projector,
                          item_vectors=base.item_vectors.numpy(), use_user_token=True, history_len=5,
                          max_title_tokens=8, candidate_order="cf", cf_items=cf_items)


def test_cf_order_shows_the_best_cf_score_first(tiny):
    """candidate_order='cf': the prompt lists the candidates by <x_u, E_i>, best first; ties keep the given
    order; ids past the CF table (the service's new items) come last in the given order."""
    from allmrec.recommender import Example
    _, llm, tok = tiny
    E = np.zeros((len(ALL_TITLES) + 1, 2), dtype=np.float32)
    E[1:, 0] = np.arange(1, len(ALL_TITLES) + 1)  # item i scores i * x_u[0]
    rec = _cf_recommender(tok, llm, E[:9])  # items 9, 10 unknown to the CF model
    ex = Example(np.array([1.0, 0.0], dtype=np.float32), [1, 2], [3, 10, 7, 9, 5])
    assert [ex.candidates[i] for i in rec.prompt_order(ex)] == [7, 5, 3, 10, 9]
    flipped = Example(np.array([-1.0, 0.0], dtype=np.float32), [1, 2], [3, 10, 7, 9, 5])
    assert rec.shown(flipped).candidates == [3, 5, 7, 10, 9]
    tie = Example(np.zeros(2, dtype=np.float32), [1], [4, 2, 6])
    assert rec.shown(tie).candidates == [4, 2, 6]
    # the prompt itself lists them in that order: its text is the one of the sorted candidates
    sorted_ex = Example(ex.user_rep, ex.history, [7, 5, 3, 10, 9])
    assert torch.equal(rec.batch([ex], with_target=False)["input_ids"],
                       rec.batch([sorted_ex], with_target=False)["input_ids"])


def test_cf_order_scores_come_back_in_the_callers_order(tiny):
    """rank() and generate() answer in the order the caller gave: any order of the same candidates shows
    the same (sorted) prompt, so each item keeps its score and a named candidate is the same item."""
    from allmrec.recommender import Example
    _, llm, tok = tiny
    E = np.random.default_rng(3).standard_normal((len(ALL_TITLES) + 1, 8)).astype(np.float32)
    rec = _cf_recommender(tok, llm, E)
    ex = _examples(1, seed=4)[0]
    rev = Example(ex.user_rep, ex.history, ex.candidates[::-1])
    a, b = rec.rank([ex])[0], rec.rank([rev])[0]
    assert np.allclose(a, b[::-1], atol=1e-6)
    assert len(set(np.round(a, 5))) == len(a)  # distinct scores: a mix-up of the order would show
    (ga, ma), (gb, mb) = rec.generate([ex, rev], max_new_tokens=6)
    assert ga == gb
    assert (ma is None and mb is None) or ex.candidates[ma] == rev.candidates[mb]


def test_cf_order_needs_the_cf_table(tiny):
    from allmrec.recommender import LLMRecommender
    _, llm, tok = tiny
    base = _recommender(tok, llm)
    with pytest.raises(ValueError, match="cf_items"):
        LLMRecommender(llm, tok, base.titles, MOVIES, projector=base.projector, item_vectors=None,
                       use_user_token=True, candidate_order="cf")
    with pytest.raises(ValueError, match="candidate_order"):
        LLMRecommender(llm, tok, base.titles, MOVIES, projector=None, item_vectors=None, use_user_token=False,
                       candidate_order="by-title")


def test_cf_order_without_the_user_token_sorts_by_x_u_but_never_feeds_it(tiny):
    """The LLM-Only prompt in the CF order (stage2.order_baselines): x_u sorts the list and stays out of the
    LLM's input; an example without x_u cannot be sorted."""
    from allmrec.recommender import Example, LLMRecommender
    _, llm, tok = tiny
    E = np.zeros((len(ALL_TITLES) + 1, 2), dtype=np.float32)
    E[1:, 0] = np.arange(1, len(ALL_TITLES) + 1)
    rec = LLMRecommender(llm, tok, _recommender(tok, llm).titles, MOVIES, projector=None, item_vectors=None,
                         use_user_token=False, history_len=5, max_title_tokens=8, candidate_order="cf", cf_items=E)
    ex = Example(np.array([1.0, 0.0], dtype=np.float32), [1, 2], [3, 8, 5])
    assert rec.shown(ex).candidates == [8, 5, 3]
    b = rec.batch([ex], with_target=False)
    assert "user_reps" not in b and "item_embs" not in b
    seeded = LLMRecommender(llm, tok, rec.titles, MOVIES, projector=None, item_vectors=None, use_user_token=False,
                            history_len=5, max_title_tokens=8)
    same = Example(None, [1, 2], [8, 5, 3])
    assert torch.equal(b["input_ids"], seeded.batch([same], with_target=False)["input_ids"])  # the same text
    assert np.allclose(rec.rank([ex])[0], seeded.rank([same])[0][[2, 0, 1]], atol=1e-5)  # caller's order back
    with pytest.raises(ValueError, match="user representation"):
        rec.rank([same])
