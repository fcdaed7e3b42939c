"""The one interface every later stage uses to talk to a CF recommender, and what sequential models share.

Conventions (see allmrec/data/schema.py): items are 1..n_items, 0 is padding; users are 0..n_users-1.
A history is given as `seqs` (B, L) LEFT-padded with 0, most recent item last; L <= max_len (longer
inputs keep their last max_len columns). `x_u` is the representation after the last item, and
`score(x_u, items) = <x_u, E[items]>` for every model, so Stage-1's rec loss (a dot product of x_u with a
reconstructed item embedding) means the same thing whatever CF model is plugged in.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from allmrec.config import CFConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Training-only keys of CFConfig (lr, epochs, ...) may ride along in cfg and are ignored by models, so a
# caller can pass `dataclasses.asdict(config.cf)` as is; anything else unknown is a typo and an error.
_TRAINING_KEYS = frozenset(f.name for f in fields(CFConfig))
BATCH_KEYS = ("users", "seq", "pos", "neg")


class CFModel(nn.Module):
    """Base class. Subclasses set `name` and `defaults` and implement the four abstract methods."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"hidden": 50, "max_len": 50, "dropout": 0.2}

    def __init__(self, n_items: int, n_users: int, cfg: dict[str, Any] | None = None):
        super().__init__()
        if int(n_items) < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        if int(n_users) < 0:
            raise ValueError(f"n_users must be >= 0, got {n_users}")
        self.n_items = int(n_items)
        self.n_users = int(n_users)
        self.cfg = self._resolve_cfg(dict(cfg or {}))
        self.hidden: int = self.cfg["hidden"]
        self.max_len: int = self.cfg["max_len"]

    # ---- configuration -------------------------------------------------------------------------
    def _resolve_cfg(self, cfg: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(cfg) - set(self.defaults) - _TRAINING_KEYS)
        if unknown:
            raise ValueError(f"{self.name}: unknown config keys {unknown}; known: {sorted(self.defaults)}")
        out: dict[str, Any] = {}
        for key, default in self.defaults.items():
            value = cfg.get(key, default)
            if isinstance(default, bool) or not isinstance(default, (int, float, list)):
                pass
            elif isinstance(default, int):
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError(f"{self.name}: cfg[{key!r}] must be an integer, got {value!r}")
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            elif isinstance(default, list):
                value = [int(v) for v in value]
            out[key] = value
        if out["hidden"] < 1 or out["max_len"] < 1:
            raise ValueError(f"{self.name}: hidden and max_len must be >= 1, got {out['hidden']}, {out['max_len']}")
        if not 0.0 <= out["dropout"] < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {out['dropout']}")
        return out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- the interface -------------------------------------------------------------------------
    def item_embeddings(self) -> torch.Tensor:
        """(n_items + 1, d); row 0 (padding) is zeros. `score` dots x_u with exactly these rows."""
        raise NotImplementedError

    def user_representation(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, d) representation after the last item of each left-padded history."""
        raise NotImplementedError

    def sequence_representations(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d) representation after each position (zeros at padding); the last column is x_u.
        Used by Stage-1's "all items" variant."""
        raise NotImplementedError

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss of a batch made by `allmrec.cf.data.TrainBatches` (keys users, seq, pos, neg)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss, so that a DistributedDataParallel wrapper (which syncs gradients only for
        work done through its forward) can train any CF model as `ddp_model(batch)`."""
        return self.training_loss(batch)

    def score(self, x_u: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, C) scores <x_u, E[items]> from x_u (B, d) and item ids (B, C)."""
        if x_u.dim() != 2 or items.dim() != 2 or x_u.shape[0] != items.shape[0]:
            raise ValueError(f"score expects x_u (B, d) and items (B, C), got {tuple(x_u.shape)}, {tuple(items.shape)}")
        emb = F.embedding(items, self.item_embeddings())  # (B, C, d)
        return torch.einsum("bd,bcd->bc", x_u, emb)

    # ---- input checks shared by all models ------------------------------------------------------
    def _check_seqs(self, seqs: torch.Tensor) -> torch.Tensor:
        if not isinstance(seqs, torch.Tensor) or seqs.dim() != 2 or seqs.dtype not in (torch.int64, torch.int32):
            raise ValueError("seqs must be an integer tensor of shape (B, L); build it with allmrec.cf.data.pad_left")
        seqs = seqs[:, -self.max_len:].long()
        if seqs.numel():
            lo, hi = int(seqs.min()), int(seqs.max())
            if lo < 0 or hi > self.n_items:
                raise ValueError(f"item ids must be in 0..{self.n_items} (0 = padding), got range {lo}..{hi}")
            real = seqs != 0
            if bool((real[:, :-1] & ~real[:, 1:]).any()):
                raise ValueError("seqs must be LEFT-padded: found a 0 after a real item")
        return seqs

    @staticmethod
    def _check_batch(batch: dict[str, torch.Tensor]) -> None:
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"training batch lacks keys {missing}; expected {list(BATCH_KEYS)} (allmrec.cf.data)")

    # ---- persistence: safetensors weights + JSON config, never pickle ---------------------------
    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {"name": self.name, "n_items": self.n_items, "n_users": self.n_users, "cfg": self.cfg}
        # each file appears complete or not at all (temp name, then rename)
        tmp = directory / f".{WEIGHTS_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        save_file(state, str(tmp))
        os.replace(tmp, directory / WEIGHTS_FILE)
        tmp = directory / f".{CONFIG_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> "CFModel":
        """Rebuild a saved model (any registered kind when called on CFModel); returned in eval mode."""
        from allmrec.cf import CF_MODELS  # the registry imports this module

        directory = Path(directory)
        if not (directory / CONFIG_FILE).exists() or not (directory / WEIGHTS_FILE).exists():
            raise FileNotFoundError(f"{directory} has no saved CF model ({CONFIG_FILE} + {WEIGHTS_FILE})")
        meta = json.loads((directory / CONFIG_FILE).read_text())
        name = meta.get("name")
        if name not in CF_MODELS:
            raise ValueError(f"{directory}: unknown CF model {name!r}; known: {sorted(CF_MODELS)}")
        model_cls = CF_MODELS[name]
        if cls is not CFModel and not issubclass(model_cls, cls):
            raise ValueError(f"{directory} holds a {name!r} model, not a {cls.name!r} model")
        model = model_cls(meta["n_items"], meta["n_users"], meta["cfg"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
        return model.to(device).eval()


def bce_pos_neg(h: torch.Tensor, pos_emb: torch.Tensor, neg_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of BCE(<h, e_pos>, 1) + BCE(<h, e_neg>, 0) (SASRec's objective)."""
    pos_logits = (h * pos_emb).sum(-1)
    neg_logits = (h * neg_emb).sum(-1)
    loss = (F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits), reduction="none")
            + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits), reduction="none"))
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1.0)


class SequentialCFModel(CFModel):
    """A model whose representation at position t depends only on items <= t. Subclasses own an
    `item_emb` table (padding_idx 0) and implement `encode(seqs) -> (B, L, d)` (zeros at padding)."""

    item_emb: nn.Embedding

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        w = self.item_emb.weight
        # row 0 is zero by construction (padding_idx); masking it makes that a guarantee for callers
        return torch.cat([w.new_zeros(1, w.shape[1]), w[1:]], dim=0)

    def sequence_representations(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self._check_seqs(seqs))

    def user_representation(self, seqs: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self._check_seqs(seqs))[:, -1]

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._check_batch(batch)
        seq, pos, neg = batch["seq"], batch["pos"], batch["neg"]
        h = self.encode(seq)
        return bce_pos_neg(h, self.item_emb(pos), self.item_emb(neg), pos != 0)
