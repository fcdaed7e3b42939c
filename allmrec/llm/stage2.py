"""Stage-2: project CF vectors into the frozen LLM's token space and train on next-title loss.

Only `Stage2Projector` learns. The LLM is frozen and reached through its inputs: its token
embeddings with soft tokens spliced in go into `inputs_embeds`, and the loss is the cross-entropy
of the target title's tokens (plus eos). The LM head runs only where there is a target: the final
hidden states are gathered at the positions that predict a target token (the left-padded batches put
them at the same right edge; padded target columns are dropped), then the head is applied to that
(n_targets, hidden) block. With 150k-260k-token vocabularies the head is a large part of a step, and
`logits_to_keep` in bf16 on CPU copies the whole transposed head every call (the kept slice is not
contiguous), which this avoids.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .prompt import IGNORE, Placeholders, embed_with_soft_tokens, positions_from_mask


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    # LayerNorm after the first layer (as in the reference implementation): the inputs have very
    # different scales (SASRec states vs. Stage-1 joint embeddings vs. raw CF embeddings), and a
    # normalized hidden layer keeps the initial soft tokens near the scale of real token embeddings.
    return nn.Sequential(nn.Linear(d_in, d_out), nn.LayerNorm(d_out), nn.GELU(), nn.Linear(d_out, d_out))


class Stage2Projector(nn.Module):
    """F_U: R^user_dim -> R^llm_dim and F_I: R^item_dim -> R^llm_dim, 2-layer MLPs (paper, Stage-2).
    `user_dim=None` builds no F_U (the "w/o user token" ablation)."""

    def __init__(self, user_dim: int | None, item_dim: int | None, llm_dim: int) -> None:
        super().__init__()
        if llm_dim < 1 or (user_dim is not None and user_dim < 1) or (item_dim is not None and item_dim < 1):
            raise ValueError(f"bad projector sizes user_dim={user_dim} item_dim={item_dim} llm_dim={llm_dim}")
        self.user_dim, self.item_dim, self.llm_dim = user_dim, item_dim, llm_dim
        self.user_proj = _mlp(user_dim, llm_dim) if user_dim is not None else None
        self.item_proj = _mlp(item_dim, llm_dim) if item_dim is not None else None

    def forward(self, user_reps: torch.Tensor | None,
                item_embs: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """user_reps (B, user_dim) -> (B, H); item_embs (B, S, item_dim) -> (B, S, H); None passes through."""
        user_soft = item_soft = None
        if user_reps is not None:
            if self.user_proj is None:
                raise ValueError("user_reps given but the projector has no user MLP (user_dim=None)")
            user_soft = self.user_proj(user_reps)
        if item_embs is not None:
            if self.item_proj is None:
                raise ValueError("item_embs given but the projector has no item MLP (item_dim=None)")
            item_soft = self.item_proj(item_embs)
        return user_soft, item_soft


def soft_prompt_embeds(llm: nn.Module, projector: Stage2Projector | None, input_ids: torch.Tensor,
                       placeholders: Placeholders, user_reps: torch.Tensor | None = None,
                       item_embs: torch.Tensor | None = None) -> torch.Tensor:
    """inputs_embeds of a batch: LLM embeddings with the projected soft tokens at the placeholders.
    Shared by training, evaluation and serving (projector None: the LLM-Only prompt)."""
    user_soft = item_soft = None
    if projector is not None:
        user_soft, item_soft = projector(user_reps, item_embs)
    elif user_reps is not None or item_embs is not None:
        raise ValueError("CF vectors given without a projector")
    return embed_with_soft_tokens(llm, input_ids, placeholders, user_soft, item_soft)


def output_logits(llm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states (..., H) -> (..., V), with what the model's own forward does
    after its head: Gemma 2/3's final logit soft-capping (the only such step among the causal LMs
    this project loads: Llama, OPT, Qwen2, Gemma3; a test checks each against the full forward)."""
    logits = llm.get_output_embeddings()(hidden)
    cap = getattr(llm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_logits(llm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  keep: torch.Tensor) -> torch.Tensor:
    """Logits at the positions where `keep` (B, T) is True, (n_kept, V), row-major order: the backbone
    over the whole sequence, then the head on the gathered (n_kept, H) hidden states only."""
    if keep.shape != inputs_embeds.shape[:2] or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool mask of shape {tuple(inputs_embeds.shape[:2])}")
    backbone = getattr(llm, llm.base_model_prefix)
    out = backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                   position_ids=positions_from_mask(attention_mask), use_cache=False)
    return output_logits(llm, out.last_hidden_state[keep])  # boolean gather: contiguous (n_kept, H)


def stage2_loss(llm: nn.Module, projector: Stage2Projector, batch: dict[str, torch.Tensor],
                user_reps: torch.Tensor | None, item_embs: torch.Tensor | None,
                placeholders: Placeholders, choice_weight: float = 1.0, candidate_softmax: float = 0.0,
                cand_first: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the target title tokens (+ eos) of a left-padded batch from `collate`.

    choice_weight: weight of each row's first target token, the one where the 20 candidates compete (the
    later tokens mostly copy the chosen title from the prompt); 1.0 is the paper's plain mean.
    candidate_softmax: weight of an added term (0 = the paper's loss alone), the cross-entropy of the
    target among the candidates at the answer's first position: the logits there restricted to the
    candidates' first tokens `cand_first` (B, C), each distinct token once. The full-vocabulary loss spends
    its gradient on putting mass on *some* candidate; this term only on *which* one, what Hit@1 measures.
    It costs nothing more: those logits are computed for the first target token anyway."""
    if not (choice_weight > 0 and math.isfinite(choice_weight)):
        raise ValueError(f"choice_weight must be finite and > 0, got {choice_weight}")
    if not (candidate_softmax >= 0 and math.isfinite(candidate_softmax)):
        raise ValueError(f"candidate_softmax must be finite and >= 0, got {candidate_softmax}")
    if candidate_softmax > 0 and cand_first is None:
        raise ValueError("candidate_softmax > 0 needs the candidates' first token ids (cand_first)")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    is_tgt = labels != IGNORE
    n_tgt = int(is_tgt.sum(1).max())
    if n_tgt == 0:
        raise ValueError("the batch has no target tokens (build prompts with target_title)")
    T = ids.shape[1]
    if n_tgt >= T or bool(is_tgt[:, : T - n_tgt].any()):
        raise ValueError("targets must end every row (left padding) and follow a non-empty prompt")
    embeds = soft_prompt_embeds(llm, projector, ids, placeholders, user_reps, item_embs)
    # Position t predicts token t+1: the last n_tgt tokens are predicted by positions T-n_tgt-1 .. T-2.
    tgt = labels[:, -n_tgt:]
    valid = tgt != IGNORE  # (B, n_tgt); a shorter answer leaves IGNORE columns on the left
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, T - n_tgt - 1:T - 1] = valid
    logits = target_logits(llm, embeds, mask, keep).float()  # (n_valid, V), row-major like tgt[valid]
    ce = F.cross_entropy(logits, tgt[valid], reduction="none")
    first = (valid.long().cumsum(1) == 1) & valid  # right-aligned targets: a row's first valid column is its first token
    if choice_weight == 1.0:
        loss = ce.mean()
    else:
        w = torch.where(first[valid], choice_weight, 1.0).to(ce.dtype)
        loss = (ce * w).sum() / w.sum()
    if candidate_softmax > 0:
        loss = loss + candidate_softmax * candidate_choice_loss(logits[first[valid]], tgt[first], cand_first)
    return loss


def candidate_choice_loss(first_logits: torch.Tensor, target_first: torch.Tensor, cand_first: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -log softmax(first_logits restricted to the distinct ids of cand_first)[target].

    first_logits (B, V) at each row's answer position, target_first (B,) the target's first token (one of
    the row's candidates' first tokens), cand_first (B, C) token ids, -1 for no candidate. A token shared
    by several candidates (two titles starting " The") enters the softmax once."""
    if cand_first.shape[0] != first_logits.shape[0] or cand_first.dim() != 2:
        raise ValueError(f"cand_first must be (B={first_logits.shape[0]}, C), got {tuple(cand_first.shape)}")
    ok = cand_first >= 0
    dup = (cand_first[:, :, None] == cand_first[:, None, :]).tril(-1).any(-1)  # the same id earlier in the row
    keep = ok & ~dup
    hit = keep & (cand_first == target_first[:, None])
    if not bool(hit.any(1).all()):
        raise ValueError("a row's target does not start like any of its candidates")
    lg = first_logits.float().gather(1, cand_first.clamp(min=0)).masked_fill(~keep, float("-inf"))
    return (torch.logsumexp(lg, 1) - lg.masked_fill(~hit, float("-inf")).logsumexp(1)).mean()
