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
                placeholders: Placeholders, choice_weight: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy over the target title tokens (+ eos) of a left-padded batch from `collate`.

    choice_weight: weight of each row's first target token, the one where the 20 candidates compete (the
    later tokens mostly copy the chosen title from the prompt); 1.0 is the paper's plain mean."""
    if not (choice_weight > 0 and math.isfinite(choice_weight)):
        raise ValueError(f"choice_weight must be finite and > 0, got {choice_weight}")
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
    if choice_weight == 1.0:
        return ce.mean()
    first = valid.long().cumsum(1) == 1  # targets are right-aligned: a row's first valid column is its first token
    w = torch.where(first[valid], choice_weight, 1.0).to(ce.dtype)
    return (ce * w).sum() / w.sum()
