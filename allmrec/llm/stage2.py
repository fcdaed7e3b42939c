"""Stage-2: project CF vectors into the frozen LLM's token space and train on next-title loss.

Only `Stage2Projector` learns. The LLM is frozen and reached through its inputs: its token
embeddings with soft tokens spliced in go into `inputs_embeds`, and the loss is the cross-entropy
of the target title's tokens (plus eos). Logits are computed only for the answer positions
(`logits_to_keep`), which the left-padded batches put at the same right edge.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .prompt import IGNORE, Placeholders, embed_with_soft_tokens, lm_forward


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
    logits, _ = lm_forward(llm, embeds, mask, logits_to_keep=n_tgt + 1)
    logits = logits[:, -(n_tgt + 1):-1].float()
    tgt = labels[:, -n_tgt:]
    if choice_weight == 1.0:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)
    ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=IGNORE, reduction="none")  # (B, n_tgt)
    valid = (tgt != IGNORE).float()
    first = valid.cumsum(1) == 1  # targets are right-aligned: a row's first valid column is its first token
    w = valid * torch.where(first & (valid > 0), choice_weight, 1.0)
    return (ce * w).sum() / w.sum()
