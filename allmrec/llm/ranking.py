"""Recommending with the frozen LLM: rank candidates by likelihood, or generate a title and match it.

Ranking runs the prompt once, keeps its KV cache, copies the cache once per candidate and scores
every candidate title (the same " title<eos>" ids Stage-2 trains on) in one batched forward. It
gives a full order (Hit@K, NDCG@K) and never names an item outside the candidate set.
Generation is the paper's protocol: greedy decoding, then an exact match (after normalization)
against the candidate titles — not a substring test, so a generation listing two titles is a miss.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data.text import normalize_title
from .prompt import lm_forward


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


@torch.no_grad()
def rank_candidates(llm: torch.nn.Module, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor,
                    candidate_token_ids: Sequence, length_norm: bool = True) -> torch.Tensor:
    """Log-likelihood of each candidate continuation given the prompt.

    prompt_embeds (B, T, H) left-padded (from `soft_prompt_embeds`), attention_mask (B, T).
    candidate_token_ids: list[list[int]] for B == 1 -> scores (n_cand,); or one such list per user ->
    (B, max n_cand), -inf where a user has fewer candidates. length_norm: mean log-prob per token
    (titles of different lengths compete fairly), else the sum.
    """
    if prompt_embeds.dim() != 3 or attention_mask.shape != prompt_embeds.shape[:2]:
        raise ValueError(f"prompt_embeds (B,T,H) and attention_mask (B,T) expected, got "
                         f"{tuple(prompt_embeds.shape)} and {tuple(attention_mask.shape)}")
    B = prompt_embeds.shape[0]
    nested, flat = _as_nested(candidate_token_ids, B)
    dev = prompt_embeds.device

    # 1) the prompt, once per user: cache + the distribution of the first answer token
    logits, past = lm_forward(llm, prompt_embeds, attention_mask, use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)

    # 2) one row per (user, candidate); candidates right-padded, so padding never precedes a real token
    user_of = torch.tensor([u for u, c in enumerate(nested) for _ in c], device=dev)
    rows = [c for cands in nested for c in cands]
    L = max(len(c) for c in rows)
    cand = torch.zeros((len(rows), L), dtype=torch.long, device=dev)
    cmask = torch.zeros((len(rows), L), dtype=torch.long, device=dev)
    for r, c in enumerate(rows):
        cand[r, : len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[r, : len(c)] = 1
    total = first_logp[user_of, cand[:, 0]]
    if L > 1:
        # Feed tokens 0..L-2 of every candidate on top of its user's cached prompt; token j+1 is
        # predicted at fed position j. Positions continue after each user's real prompt length.
        past.reorder_cache(user_of)
        fed = llm.get_input_embeddings()(cand[:, :-1])
        mask = torch.cat([attention_mask[user_of].long(), cmask[:, :-1]], dim=1)
        start = attention_mask.long().sum(1)[user_of]
        pos = start[:, None] + torch.arange(L - 1, device=dev)[None]
        logits, _ = lm_forward(llm, fed, mask, position_ids=pos, past_key_values=past)
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, cand[:, 1:, None]).squeeze(-1)
        total = total + (lp * cmask[:, 1:]).sum(1)
    if length_norm:
        total = total / cmask.sum(1)
    if flat:
        return total
    out = torch.full((B, max(len(c) for c in nested)), float("-inf"), device=dev)
    r = 0
    for u, cands in enumerate(nested):
        out[u, : len(cands)] = total[r: r + len(cands)]
        r += len(cands)
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
