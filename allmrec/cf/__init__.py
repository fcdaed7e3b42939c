"""Collaborative-filtering recommenders behind one interface (`CFModel`, allmrec/cf/base.py).

Plugging in a new CF model: write `allmrec/cf/<name>.py` with a `CFModel` subclass that sets `name` and
`defaults` (its config keys; hidden, max_len and dropout at least) and implements `item_embeddings`,
`user_representation`, `sequence_representations` and `training_loss` (a sequential model can subclass
`SequentialCFModel` and implement only `encode(seqs) -> (B, L, d)`), then add its class to `CF_MODELS`
below (one line). Training, saving/loading, Stage-1/2, evaluation and serving then accept `cf.model=<name>`.
"""
from __future__ import annotations

from typing import Any

from allmrec.cf.base import CFModel, SequentialCFModel
from allmrec.cf.gru4rec import GRU4Rec
from allmrec.cf.morec import MoRec
from allmrec.cf.ncf import NCF
from allmrec.cf.nextitnet import NextItNet
from allmrec.cf.sasrec import SASRec

CF_MODELS: dict[str, type[CFModel]] = {cls.name: cls for cls in (SASRec, GRU4Rec, NextItNet, NCF, MoRec)}


def build_cf_model(name: str, n_items: int, n_users: int, cfg: dict[str, Any] | None = None,
                   **inputs: Any) -> CFModel:
    """`inputs`: extra constructor inputs of models that need them (MoRec: text_emb)."""
    if name not in CF_MODELS:
        raise ValueError(f"unknown CF model {name!r}; known: {sorted(CF_MODELS)}")
    return CF_MODELS[name](n_items, n_users, cfg or {}, **inputs)


def load_cf_model(directory, device="cpu") -> CFModel:
    """A model saved with `CFModel.save`, whatever its kind (eval mode)."""
    return CFModel.load(directory, device)


__all__ = ["CFModel", "SequentialCFModel", "CF_MODELS", "build_cf_model", "load_cf_model",
           "SASRec", "GRU4Rec", "NextItNet", "NCF", "MoRec"]
