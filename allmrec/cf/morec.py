"""MoRec (Yuan et al., SIGIR 2023), the modality-based baseline of the A-LLMRec paper: SASRec whose item
embedding table is not a free ID table but a trainable projection of the items' frozen SBERT text vectors.

    E_i = g(Q_i),  Q_i = SBERT("Title: t, Description: d") from `allmrec encode` (frozen, a buffer),
    g = Linear(dim, d) (proj_layers=1) or Linear(dim, proj_hidden) -> GELU -> Linear(proj_hidden, d) (2)

Everything else (blocks, positions, BCE loss, the CFModel interface) is SASRec's: the projection stands in
for SASRec's `item_emb` as a module that is called with ids and has a `.weight` (the full table). Within
one forward pass the table is projected once and shared by the inputs, positives and negatives.

The text vectors are a persistent buffer, so `model.safetensors` holds them and `load_cf_model(cf_dir)`
needs nothing else; `cfg["text_dim"]` (saved in config.json) sizes the buffer before the weights load.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from allmrec.cf.sasrec import SASRec

NO_TEXT = ("morec builds its item table from the items' SBERT text vectors, and none were given: pass "
           "text_emb=(n_items + 1, dim) (row i = item i, row 0 = padding); in the pipeline run "
           "`allmrec encode` before `allmrec train-cf cf.model=morec`")


class TextProjection(nn.Module):
    """Item table E = g(text) with row 0 (padding) zero. Quacks like the nn.Embedding SASRec expects."""

    def __init__(self, text: torch.Tensor, d: int, layers: int, inner: int):
        super().__init__()
        self.register_buffer("text", text)
        dim = text.shape[1]
        self.proj = nn.Linear(dim, d) if layers == 1 else \
            nn.Sequential(nn.Linear(dim, inner), nn.GELU(), nn.Linear(inner, d))
        # xavier weights as in SASRec; zero biases, so that at init items differ by their text alone
        for m in self.proj.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        self._table: torch.Tensor | None = None

    def project_all(self) -> torch.Tensor:
        E = self.proj(self.text)
        return torch.cat([E.new_zeros(1, E.shape[1]), E[1:]], dim=0)

    @property
    def weight(self) -> torch.Tensor:
        return self._table if self._table is not None else self.project_all()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    @contextmanager
    def shared_table(self) -> Iterator[None]:
        """Project the table once for everything done inside (re-entrant)."""
        if self._table is not None:
            yield
            return
        self._table = self.project_all()
        try:
            yield
        finally:
            self._table = None


class MoRec(SASRec):
    name: ClassVar[str] = "morec"
    # text_dim 0: taken from text_emb; saved in config.json so load() can size the buffer
    defaults: ClassVar[dict[str, Any]] = {**SASRec.defaults, "proj_layers": 2, "proj_hidden": 256, "text_dim": 0}
    # tells the train-cf job to hand over `<run>/encode/` vectors as text_emb
    needs_text_embeddings: ClassVar[bool] = True

    def __init__(self, n_items: int, n_users: int, cfg: dict[str, Any] | None = None,
                 text_emb: torch.Tensor | np.ndarray | None = None):
        super().__init__(n_items, n_users, cfg)
        c = self.cfg
        if c["proj_layers"] not in (1, 2) or c["proj_hidden"] < 1:
            raise ValueError(f"morec: proj_layers must be 1 or 2 and proj_hidden >= 1, got "
                             f"{c['proj_layers']}, {c['proj_hidden']}")
        if text_emb is None:
            if c["text_dim"] < 1:
                raise ValueError(NO_TEXT)
            # a placeholder for load(): the saved buffer replaces it; using the model before is an error
            text = torch.zeros(n_items + 1, c["text_dim"])
            self._text_ready = False
        else:
            # a copy either way: the buffer must not share memory with a read-only (e.g. Ray object store) array
            text = torch.tensor(np.asarray(text_emb, dtype=np.float32)) if not isinstance(text_emb, torch.Tensor) \
                else text_emb.detach().float().clone()
            if text.dim() != 2 or text.shape[0] != n_items + 1 or text.shape[1] < 1:
                raise ValueError(f"morec: text_emb must be (n_items + 1, dim) = ({n_items + 1}, dim), row 0 = "
                                 f"padding; got {tuple(text.shape)}")
            if c["text_dim"] not in (0, text.shape[1]):
                raise ValueError(f"morec: cfg text_dim={c['text_dim']} but text_emb has dim {text.shape[1]}")
            if not torch.isfinite(text).all():
                raise ValueError("morec: text_emb holds NaN or inf")
            text[0] = 0.0
            c["text_dim"] = int(text.shape[1])
            self._text_ready = True
        # replaces SASRec's free ID table (SASRec's encode and loss use `item_emb` unchanged)
        self.item_emb = TextProjection(text, self.hidden, c["proj_layers"], c["proj_hidden"])
        self.register_load_state_dict_post_hook(MoRec._mark_loaded)

    @staticmethod
    def _mark_loaded(module: "MoRec", incompatible) -> None:
        # keys carry the prefix of whatever module the state dict was loaded into (e.g. a DDP wrapper)
        if not any(k.endswith("item_emb.text") for k in incompatible.missing_keys):
            module._text_ready = True

    def _need_text(self) -> None:
        if not self._text_ready:
            raise ValueError(NO_TEXT + " (this model was built from its config alone: load its weights first)")

    def text_embeddings(self) -> torch.Tensor:
        """(n_items + 1, text_dim) frozen text vectors the table is projected from."""
        return self.item_emb.text

    def item_embeddings(self) -> torch.Tensor:
        self._need_text()
        return self.item_emb.weight

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        self._need_text()
        with self.item_emb.shared_table():
            return super().encode(seqs)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._need_text()
        with self.item_emb.shared_table():
            return super().training_loss(batch)


def load_text_embeddings(encode_dir: str | Path, n_items: int) -> np.ndarray:
    """(n_items + 1, dim) float32 from `<run>/encode/text_emb.parquet` (row i = item i, row 0 zeros)."""
    from allmrec.data import schema
    from allmrec.data.load import read_parquet

    path = Path(encode_dir) / schema.TEXT_EMB
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `allmrec encode` first (morec needs the items' SBERT vectors)")
    df = read_parquet(path, sort_by="item")
    items = df["item"].to_numpy().astype(np.int64)
    if len(items) == 0:
        raise ValueError(f"{path} holds no item vectors")
    emb = np.stack(df["emb"].to_numpy()).astype(np.float32)
    missing = np.setdiff1d(np.arange(1, n_items + 1), items)
    if len(missing) or items.min() < 1 or items.max() > n_items or len(np.unique(items)) != len(items):
        raise ValueError(f"{path} does not hold exactly one vector per item 1..{n_items} "
                         f"({len(missing)} missing, {len(items)} rows): re-run `allmrec encode --force`")
    out = np.zeros((n_items + 1, emb.shape[1]), dtype=np.float32)
    out[items] = emb
    return out
