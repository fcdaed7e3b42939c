"""Stage-1 of A-LLMRec: align the frozen CF model's item embeddings with SBERT text embeddings.

Item side:  e = f_I^enc(E) = sigmoid(W_I E + b) in R^d',  E_hat = f_I^dec(e) = linear back to R^d
Text side:  q = f_T^enc(Q) = sigmoid(W_T Q + b) in R^d',  Q_hat = f_T^dec(q) = linear back to R^dim

"1-layer MLP" encoders with a sigmoid, linear decoders: the reference code's `two_layer_mlp`.

    L = matching + alpha * item_recon + beta * text_recon + rec
    matching   = MSE(f_I^enc(E_pos), f_T^enc(Q_pos))
    item_recon = MSE(E, f_I^dec(f_I^enc(E)))        over the positive and the negative items
    text_recon = MSE(Q, f_T^dec(f_T^enc(Q)))        over the positive items (target detached)
    rec        = BCE(x_u . E_hat_pos, 1) + BCE(x_u . E_hat_neg, 0)      (each a batch mean)

Ablations (paper Table 5) switch terms off: `use_matching`, `use_recon` (both reconstructions), `use_rec`,
or a weight alpha / beta of 0 (one reconstruction). A switched-off term is still computed and returned,
detached, for logging, and is not part of `total`: its gradient is exactly absent, not multiplied by 0.
Frozen SBERT is `sbert_trainable_layers=0` (allmrec/align/sbert.py).

Matching alone is minimised by mapping every item and every text to one constant vector; the two
reconstruction terms forbid that (an encoder that forgets its input cannot be decoded), and `rec`
keeps the decoded item embedding usable by the CF model's user representation.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from allmrec.align.sbert import TextEncoder

LOSS_KEYS = ("total", "matching", "item_recon", "text_recon", "rec")


class Stage1Aligner(nn.Module):
    """The two autoencoders. cf_dim = d (50 for SASRec), text_dim = SBERT output, latent = d' (128)."""

    def __init__(self, cf_dim: int, text_dim: int, latent: int = 128):
        super().__init__()
        for name, v in (("cf_dim", cf_dim), ("text_dim", text_dim), ("latent", latent)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.cf_dim, self.text_dim, self.latent = cf_dim, text_dim, latent
        self.item_enc = nn.Sequential(nn.Linear(cf_dim, latent), nn.Sigmoid())
        self.item_dec = nn.Linear(latent, cf_dim)
        self.text_enc = nn.Sequential(nn.Linear(text_dim, latent), nn.Sigmoid())
        self.text_dec = nn.Linear(latent, text_dim)


def joint_embeddings(aligner: Stage1Aligner, E: torch.Tensor) -> torch.Tensor:
    """e = f_I^enc(E): the joint collaborative-text embedding Stage-2 feeds to the LLM."""
    return aligner.item_enc(E)


def text_joint_embeddings(aligner: Stage1Aligner, Q: torch.Tensor) -> torch.Tensor:
    """q = f_T^enc(Q): the stand-in for items the CF model never saw ("A-LLMRec (SBERT)")."""
    return aligner.text_enc(Q)


def _check(name: str, t: Any, cols: int, rows: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != cols or not t.is_floating_point():
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a float tensor of shape (B, {cols}), got {shape}")
    if rows is not None and t.shape[0] != rows:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows} (same batch as E_pos)")


def stage1_losses(aligner: Stage1Aligner, E_pos: torch.Tensor, E_neg: torch.Tensor, Q_pos: torch.Tensor,
                  x_u: torch.Tensor, alpha: float = 0.5, beta: float = 0.5, use_matching: bool = True,
                  use_recon: bool = True, use_rec: bool = True) -> dict[str, torch.Tensor]:
    """All Stage-1 losses. Switched-off terms (use_* False, or alpha / beta = 0) are still returned
    (detached) for logging but are left out of `total`, which is what the ablations ("w/o matching", ...)
    train on."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
    weights = {"matching": 1.0 if use_matching else 0.0, "item_recon": alpha if use_recon else 0.0,
               "text_recon": beta if use_recon else 0.0, "rec": 1.0 if use_rec else 0.0}
    if not any(weights.values()):
        raise ValueError("at least one of use_matching, use_recon (with alpha or beta > 0), use_rec must be on")
    _check("E_pos", E_pos, aligner.cf_dim)
    b = E_pos.shape[0]
    _check("E_neg", E_neg, aligner.cf_dim, b)
    _check("Q_pos", Q_pos, aligner.text_dim, b)
    _check("x_u", x_u, aligner.cf_dim, b)

    # one pass of the item autoencoder over positives and negatives together
    E = torch.cat([E_pos, E_neg], 0)
    e = aligner.item_enc(E)
    E_hat = aligner.item_dec(e)
    q = aligner.text_enc(Q_pos)
    Q_hat = aligner.text_dec(q)

    matching = F.mse_loss(e[:b], q)
    item_recon = F.mse_loss(E_hat, E)
    # detached target, as in the reference: SBERT learns through q, not by chasing its own reconstruction
    text_recon = F.mse_loss(Q_hat, Q_pos.detach())
    pos_logits = (x_u * E_hat[:b]).sum(-1)
    neg_logits = (x_u * E_hat[b:]).sum(-1)
    rec = F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits)) \
        + F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits))

    parts = {"matching": matching, "item_recon": item_recon, "text_recon": text_recon, "rec": rec}
    total = torch.zeros((), device=E_pos.device, dtype=matching.dtype)
    for k, w in weights.items():
        if w:
            total = total + w * parts[k]
        else:
            parts[k] = parts[k].detach()
    return {"total": total, **parts}


class Stage1Model(nn.Module):
    """Everything Stage-1 trains, as one module: the aligner plus the (partly) fine-tuned SBERT.

    How the training loop uses it (plain PyTorch, DDP, or a DeepSpeed engine alike):

        model = Stage1Model(aligner, text_encoder, alpha=cfg.alpha, beta=cfg.beta, ...)
        model.text_encoder.pretokenize(texts)            # texts[i] = text of item id i ("" at 0)
        model.text_encoder.precompute_lower(64)          # only does work if sbert_trainable_layers >= 0
        engine = deepspeed.initialize(model=model, model_parameters=model.trainable_parameters(), ...)
        for users in loader:                             # one example per user: its last item
            with torch.no_grad():                        # the CF model is frozen, in eval(), outside
                x_u = cf.user_repr(seq_without_last)     # (B, d)
                E_pos, E_neg = cf.item_emb(pos), cf.item_emb(neg)
            losses = engine({"pos_items": pos, "neg_items": neg, "x_u": x_u,
                             "E_pos": E_pos, "E_neg": E_neg})
            engine.backward(losses["total"]); engine.step()

    Batch keys: pos_items, neg_items (B,) LongTensor item ids (rows of the TokenCache); x_u, E_pos,
    E_neg (B, d) float tensors. Only the positive items' texts are encoded (as in the paper's loss);
    neg_items is accepted for symmetry and validated, not encoded. Returns the dict of
    `stage1_losses` (total, matching, item_recon, text_recon, rec), all scalars.

    Notes for distributed use: the token/lower-layer caches are plain CPU tensors, not buffers, so
    they are neither broadcast nor checkpointed; build them on every worker (after loading weights,
    before wrapping). With every SBERT-reaching loss switched off (no matching, no recon) SBERT
    gets no gradient (DeepSpeed then steps it with zero gradients: unchanged, but its forward and
    backward are wasted): freeze it (sbert_trainable_layers=0) for that ablation.
    """

    def __init__(self, aligner: Stage1Aligner, text_encoder: TextEncoder, alpha: float = 0.5, beta: float = 0.5,
                 use_matching: bool = True, use_recon: bool = True, use_rec: bool = True):
        super().__init__()
        if aligner.text_dim != text_encoder.dim:
            raise ValueError(f"aligner.text_dim={aligner.text_dim} but the text encoder outputs {text_encoder.dim}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        if not (use_matching or use_rec or (use_recon and alpha + beta > 0)):
            raise ValueError("at least one of use_matching, use_recon (with alpha or beta > 0), use_rec must be on")
        self.aligner = aligner
        self.text_encoder = text_encoder
        self.alpha, self.beta = float(alpha), float(beta)
        self.use_matching, self.use_recon, self.use_rec = use_matching, use_recon, use_rec

    @classmethod
    def from_config(cls, cfg, cf_dim: int, text_encoder: TextEncoder) -> "Stage1Model":
        """From a Stage1Config (alpha, beta, latent, use_* switches)."""
        aligner = Stage1Aligner(cf_dim, text_encoder.dim, cfg.latent)
        return cls(aligner, text_encoder, cfg.alpha, cfg.beta, cfg.use_matching, cfg.use_recon, cfg.use_rec)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in ("pos_items", "neg_items", "x_u", "E_pos", "E_neg") if k not in batch]
        if missing:
            raise ValueError(f"Stage1Model batch lacks {missing}")
        pos, neg = batch["pos_items"], batch["neg_items"]
        if pos.dim() != 1 or neg.shape != pos.shape:
            raise ValueError(f"pos_items and neg_items must be (B,) of equal shape, got "
                             f"{tuple(pos.shape)} and {tuple(neg.shape)}")
        self.text_encoder._need_tokens().check(neg)
        dev = next(self.aligner.parameters()).device
        Q_pos = self.text_encoder.encode_items(pos).to(dev)
        # under bf16/fp16 engines, the CF tensors come in fp32: match the aligner's dtype
        dtype = next(self.aligner.parameters()).dtype
        x_u, E_pos, E_neg = (batch[k].to(dev, dtype) for k in ("x_u", "E_pos", "E_neg"))
        return stage1_losses(self.aligner, E_pos, E_neg, Q_pos.to(dtype), x_u, self.alpha, self.beta,
                             self.use_matching, self.use_recon, self.use_rec)
