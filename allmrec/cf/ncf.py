"""NCF (He et al., WWW 2017), GMF instantiation: a user tower and an item tower meet in a dot product.

score(u, i) = <P[u], Q[i]>, trained with BCE on (user, interacted item) against a sampled negative
item. NeuMF's MLP branch is left out on purpose: it scores a (user, item) pair jointly, whereas every
stage here needs score(x_u, items) = <x_u, E[items]> (Stage-1's rec loss dots x_u with reconstructed
item embeddings); a GMF output weight vector h is absorbed into P (h * P[u] is again a free vector).

Non-sequential: order within the history is ignored, and the training window is the last max_len + 1
items of a user's training sequence (all of them for max_len >= the sequence length).

User representation:
- a user seen in training (0 <= id < n_users): x_u = P[u], the user-tower embedding; the history is
  not used;
- a user never seen in training (`users` is None, or id < 0 or id >= n_users; cold users, cross-domain):
  x_u = the mean of Q[i] over the items i of the given history (zeros for an empty history). MF puts
  P[u] near the items u interacted with, so the history centroid is the natural fold-in of a new user,
  and it lives in the same space, so score() is the same dot product for both kinds of user.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn

from allmrec.cf.base import CFModel, bce_pos_neg


class NCF(CFModel):
    name: ClassVar[str] = "ncf"
    defaults: ClassVar[dict[str, Any]] = {"hidden": 50, "max_len": 50, "dropout": 0.2}

    def __init__(self, n_items: int, n_users: int, cfg: dict[str, Any] | None = None):
        super().__init__(n_items, n_users, cfg)
        d = self.hidden
        self.user_emb = nn.Embedding(max(n_users, 1), d)
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.drop = nn.Dropout(self.cfg["dropout"])
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def item_embeddings(self) -> torch.Tensor:
        w = self.item_emb.weight
        return torch.cat([w.new_zeros(1, w.shape[1]), w[1:]], dim=0)

    def _known(self, users: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if users is None:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        users = users.reshape(-1)
        if users.shape[0] != batch:
            raise ValueError(f"users has {users.shape[0]} rows, seqs has {batch}")
        return (users >= 0) & (users < self.n_users)

    def sequence_representations(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        seqs = self._check_seqs(seqs)
        real = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        # unseen users: running mean of the history so far (the prefix the model has been shown)
        emb = self.item_emb(seqs) * real
        prefix_mean = emb.cumsum(1) / real.cumsum(1).clamp(min=1.0)
        known = self._known(users, seqs.shape[0], seqs.device)
        if not bool(known.any()):
            return prefix_mean
        ids = torch.where(known, users.reshape(-1), torch.zeros_like(users.reshape(-1)))
        p = self.user_emb(ids).unsqueeze(1) * real
        return torch.where(known[:, None, None], p, prefix_mean)

    def user_representation(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        seqs = self._check_seqs(seqs)
        known = self._known(users, seqs.shape[0], seqs.device)
        real = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        centroid = (self.item_emb(seqs) * real).sum(1) / real.sum(1).clamp(min=1.0)
        if not bool(known.any()):
            return centroid
        ids = torch.where(known, users.reshape(-1), torch.zeros_like(users.reshape(-1)))
        return torch.where(known[:, None], self.user_emb(ids), centroid)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_batch(batch)
        users, seq, pos, neg = batch["users"], batch["seq"], batch["pos"], batch["neg"]
        if bool(((users < 0) | (users >= self.n_users)).any()):
            raise ValueError(f"ncf: training users must be in 0..{self.n_users - 1}")
        # seq = s[:-1] and pos = s[1:] (windowed), so seq plus the last target is the whole window; the
        # extra column reuses a negative sampled for the same user (any column is a valid negative)
        items = torch.cat([seq, pos[:, -1:]], dim=1)
        negs = torch.cat([neg, neg[:, :1]], dim=1)
        x_u = self.drop(self.user_emb(users)).unsqueeze(1).expand(-1, items.shape[1], -1)
        return bce_pos_neg(x_u, self.item_emb(items), self.item_emb(negs), items != 0)
