"""Recommending with the frozen LLM: rank candidates by likelihood, or generate a title and match it.

Ranking runs each user's prompt once, keeps its KV cache, and scores every candidate title (the same
" title<eos>" ids Stage-2 trains on) in one more forward pass in which all the candidates of that user
share the prompt's cache: they are packed one after another into a single sequence whose attention
mask lets each candidate token see the prompt and the earlier tokens of its own candidate only, with
position ids that continue after the prompt for every candidate (no per-candidate copy of the cache:
memory grows with the candidates' tokens, not with candidates x prompt). The LM head is applied only
at the positions whose next token is scored (the hidden states are gathered first), in chunks of
`HEAD_CHUNK` rows, so the logits never cost more than HEAD_CHUNK x vocabulary floats.

Models with sliding-window attention layers (Gemma3: window 512) keep only the last window - 1 tokens in
those layers' cache, so when a prompt plus a candidate is longer than the window the prompt and the packed
candidates run in one forward instead, with one mask per layer type (the windowed one also cut at the
window, as the model masks itself in training).

Batch invariance: every user is run alone (no left padding, batch size 1), so the numbers of a user
depend only on that user's prompt and candidates, never on what else was passed in the same call. On a
bf16 model this matters: matrix kernels pick their blocking from the number of rows, so the rounding of
a row changes with the batch it is in (docs/serving.md, "Same answer every time").

It gives a full order (Hit@K, NDCG@K) and never names an item outside the candidate set.
Generation is the paper's protocol: greedy decoding, then an exact match (after normalization)
against the candidate titles — not a substring test, so a generation listing two titles is a miss.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.text import normalize_title
from .prompt import lm_forward
from .stage2 import output_logits

HEAD_CHUNK = 256  # positions per LM-head call while scoring (bounds the logits to HEAD_CHUNK x vocab)


def _as_nested(candidate_token_ids: Sequence, B: int) -> tuple[list[list[list[int]]], bool]:
    """Accept one user's candidates (list[list[int]]) or one list per user; say which it was."""
    if len(candidate_token_ids) == 0:
        raise ValueError("no candidates given")
    first = candidate_token_ids[0]
    flat = len(first) > 0 and not isinstance(first[0], (list, tuple))
    nested = [list(candidate_token_ids)] if flat else [list(c) for c in candidate_token_ids]
    if len(nested) != B:
        raise ValueError(f"candidates for {len(nested)} users but prompts for {B}")
    for u, cands in enumerate(nested):
        if not cands:
            raise ValueError(f"user {u} has no candidates")
        if any(len(c) == 0 for c in cands):
            raise ValueError(f"user {u} has an empty candidate token list")
    return nested, flat


def backbone(llm: torch.nn.Module) -> torch.nn.Module:
    """The transformer without its LM head (returns last_hidden_state): LlamaModel, OPTModel, GPT2Model..."""
    return getattr(llm, llm.base_model_prefix)


def _head_logits(llm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of final hidden states (n, H): Stage-2's `output_logits` (the head + soft-capping)."""
    return output_logits(llm, hidden.contiguous()).float()


def head_log_probs(llm: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) for final hidden states (N, H) and token ids (N,): the LM head is
    applied to these rows only, `chunk` rows at a time (fp32 log-softmax), so memory is bounded by
    chunk x vocab whatever N (with what the model applies after its head: `output_logits`)."""
    out = []
    for i in range(0, hidden.shape[0], chunk):
        logits = _head_logits(llm, hidden[i:i + chunk])
        t = targets[i:i + chunk, None]
        out.append(logits.gather(-1, t).squeeze(-1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _as_mask(llm: torch.nn.Module, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Q, K) allowed pairs -> the (1, 1, Q, K) mask the model's attention takes: boolean (True = attend)
    for SDPA / flex, additive float for eager."""
    allowed = allowed[None, None]
    impl = getattr(llm.config, "_attn_implementation", "eager") or "eager"
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    if impl not in ("sdpa", "flex_attention"):
        raise ValueError(f"ranking packs the candidates with a custom attention mask, which attn_implementation="
                         f"{impl!r} does not take; load the LLM with attn_implementation='sdpa' or 'eager'")
    return allowed


def _packed_allowed(n_prompt: int, lengths: list[int], device: torch.device) -> torch.Tensor:
    """(N, n_prompt + N) of packed candidates: token j of candidate k sees the whole prompt and tokens
    0..j of candidate k."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    n = len(seg)
    idx = torch.arange(n, device=device)
    own = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])
    return torch.cat([torch.ones((n, n_prompt), dtype=torch.bool, device=device), own], dim=1)


def _packed_mask(llm: torch.nn.Module, n_prompt: int, lengths: list[int], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """(1, 1, N, n_prompt + N) mask of the packed candidates over the prompt's cache."""
    return _as_mask(llm, _packed_allowed(n_prompt, lengths, device), dtype)


def sliding_window(llm: torch.nn.Module) -> int | None:
    """The window of the model's sliding-window attention layers (Gemma3: 512), or None. Such layers see
    only keys fewer than `window` positions back, and their KV cache keeps only the last window - 1."""
    cfg = llm.config
    w = getattr(cfg, "sliding_window", None)
    if not w or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(w)


def _rank_one(llm: torch.nn.Module, prompt: torch.Tensor, cands: list[list[int]], length_norm: bool) -> torch.Tensor:
    """Scores (C,) of one user's candidates after one unpadded prompt (T, H)."""
    dev, T = prompt.device, prompt.shape[0]
    window = sliding_window(llm)
    if window is not None and T + max(len(c) for c in cands) - 1 > window:
        return _rank_one_windowed(llm, prompt, cands, length_norm, window)
    body = backbone(llm)
    # 1) the prompt: its cache, and the distribution of the first answer token (head at the last position only)
    out = body(inputs_embeds=prompt[None], attention_mask=torch.ones((1, T), dtype=torch.long, device=dev),
               position_ids=torch.arange(T, device=dev)[None], use_cache=True)
    # 2) every candidate's tokens 0..L-2, packed into one row over the shared cache; token j+1 is scored
    #    at fed token j. Positions continue after the prompt for each candidate.
    ids, pos, lengths = _packed(cands, T, dev)
    h = None
    if len(ids):
        emb = llm.get_input_embeddings()(ids)[None]
        mask = _packed_mask(llm, T, lengths, emb.dtype, dev)
        h = body(inputs_embeds=emb, attention_mask=mask, position_ids=pos[None], past_key_values=out.past_key_values,
                 use_cache=True).last_hidden_state[0]
    return _scores(llm, out.last_hidden_state[0, -1:], h, cands, lengths, length_norm)


def _packed(cands: list[list[int]], T: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The fed tokens (all but each candidate's last) packed in one row, their positions (continuing after
    a prompt of T tokens for every candidate) and each candidate's fed length."""
    lengths = [len(c) - 1 for c in cands]
    ids = torch.tensor([t for c in cands for t in c[:-1]], dtype=torch.long, device=dev)
    pos = T + torch.cat([torch.arange(n, device=dev) for n in lengths])
    return ids, pos, lengths


def _scores(llm: torch.nn.Module, last: torch.Tensor, packed_h: torch.Tensor | None, cands: list[list[int]],
            lengths: list[int], length_norm: bool) -> torch.Tensor:
    """Each candidate's log-likelihood: its first token from the prompt's last hidden state (1, H), the rest
    from the packed hidden states (N, H)."""
    dev = last.device
    total = torch.log_softmax(_head_logits(llm, last), dim=-1)[0, torch.tensor([c[0] for c in cands], device=dev)]
    if packed_h is not None:
        tgt = torch.tensor([t for c in cands for t in c[1:]], device=dev)
        owner = torch.repeat_interleave(torch.arange(len(cands), device=dev), torch.tensor(lengths, device=dev))
        total = total.index_add(0, owner, head_log_probs(llm, packed_h, tgt))
    if length_norm:
        total = total / torch.tensor([len(c) for c in cands], device=dev, dtype=total.dtype)
    return total


def _rank_one_windowed(llm: torch.nn.Module, prompt: torch.Tensor, cands: list[list[int]], length_norm: bool,
                       window: int) -> torch.Tensor:
    """`_rank_one` for a prompt + candidate longer than the model's sliding window: the window layers'
    cache would have dropped the prompt's first tokens, so the prompt and the packed candidates run in one
    forward with one mask per layer type (full attention: as packed; sliding: also at most window - 1
    positions back, as the model itself masks in training)."""
    if "sliding_attention" not in set(getattr(llm.config, "layer_types", None) or []):
        raise ValueError(f"a prompt of {prompt.shape[0]} tokens plus a candidate exceeds this model's sliding window "
                         f"({window}), and the model takes no per-layer-type masks: shorten the prompt "
                         "(stage2.history_len, stage2.max_title_tokens)")
    dev, T = prompt.device, prompt.shape[0]
    ids, packed_pos, lengths = _packed(cands, T, dev)
    emb = torch.cat([prompt, llm.get_input_embeddings()(ids).to(prompt.dtype)])[None]
    pos = torch.cat([torch.arange(T, device=dev), packed_pos])
    causal = pos[None, :T] <= pos[:T, None]
    full = torch.cat([torch.cat([causal, torch.zeros((T, len(ids)), dtype=torch.bool, device=dev)], 1),
                      _packed_allowed(T, lengths, dev)])
    near = (pos[:, None] - pos[None, :]) < window
    masks = {"full_attention": _as_mask(llm, full, emb.dtype), "sliding_attention": _as_mask(llm, full & near, emb.dtype)}
    h = backbone(llm)(inputs_embeds=emb, attention_mask=masks, position_ids=pos[None], use_cache=False).last_hidden_state[0]
    return _scores(llm, h[T - 1:T], h[T:] if len(ids) else None, cands, lengths, length_norm)


@torch.no_grad()
def rank_candidates(llm: torch.nn.Module, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    candidate_token_ids: Sequence, length_norm: bool = True) -> torch.Tensor:
    """Log-likelihood of each candidate continuation given the prompt.

    prompt_embeds (B, T, H) left-padded (from `soft_prompt_embeds`), attention_mask (B, T).
    candidate_token_ids: list[list[int]] for B == 1 -> scores (n_cand,); or one such list per user ->
    (B, max n_cand), -inf where a user has fewer candidates. length_norm: mean log-prob per token
    (titles of different lengths compete fairly), else the sum. Each user runs alone, without its
    padding: a user's scores do not depend on the other users of the call.
    """
    if prompt_embeds.dim() != 3 or attention_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(f"prompt_embeds (B,T,H) and attention_mask (B,T) expected, got "
                         f"{tuple(prompt_embeds.shape)} and {tuple(attention_mask.shape)}")
    B = prompt_embeds.shape[0]
    nested, flat = _as_nested(candidate_token_ids, B)
    keep = attention_mask.bool()
    if not bool((keep.long().cummax(1).values == keep.long()).all()) or not bool(keep.any(1).all()):
        raise ValueError("attention_mask must be left padding only (zeros, then ones) with a non-empty prompt per row")
    rows = [_rank_one(llm, prompt_embeds[b][keep[b]], nested[b], length_norm) for b in range(B)]
    if flat:
        return rows[0]
    out = torch.full((B, max(len(c) for c in nested)), float("-inf"), device=prompt_embeds.device)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def _stop_ids(llm: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(llm, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate_titles(llm: torch.nn.Module, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    tokenizer: Any, max_new_tokens: int = 32) -> list[str]:
    """Greedy decoding from left-padded prompt embeddings with a KV cache, one text per row.
    A row stops at eos (the tokenizer's or the model's) or at the first newline."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    B = prompt_embeds.shape[0]
    dev = prompt_embeds.device
    stops = _stop_ids(llm, tokenizer)
    logits, past = lm_forward(llm, prompt_embeds, attention_mask, use_cache=True, logits_to_keep=1)
    mask = attention_mask.long()
    next_pos = mask.sum(1, keepdim=True)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)
        for b, t in enumerate(nxt.tolist()):
            if done[b]:
                continue
            if t in stops:
                done[b] = True
                continue
            out[b].append(t)
            if "\n" in tokenizer.decode([t]):
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)
        emb = llm.get_input_embeddings()(nxt[:, None])
        logits, past = lm_forward(llm, emb, mask, position_ids=next_pos, past_key_values=past,
                                  use_cache=True, logits_to_keep=1)
        next_pos = next_pos + 1
    return [tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip() for ids in out]


def generate_title(llm: torch.nn.Module, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor,
                   tokenizer: Any, max_new_tokens: int = 32) -> str:
    if prompt_embeds.shape[0] != 1:
        raise ValueError("generate_title takes one prompt; use generate_titles for a batch")
    return generate_titles(llm, prompt_embeds, attention_mask, tokenizer, max_new_tokens)[0]


def match_candidate(generated: str, candidate_titles: Sequence[str]) -> int | None:
    """Index of the one candidate whose normalized title equals the normalized generation.

    None when nothing matches, or when several candidates share that title (the text cannot tell
    them apart). Pass the titles as the LLM saw them (`PromptBuilder.shown_title`): a title cut to
    `max_title_tokens` can only be generated cut.
    """
    g = normalize_title(generated)
    if not g:
        return None
    hits = [i for i, c in enumerate(candidate_titles) if normalize_title(c) == g]
    return hits[0] if len(hits) == 1 else None
