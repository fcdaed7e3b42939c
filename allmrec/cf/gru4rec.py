"""GRU4Rec (Hidasi et al., ICLR 2016) trained with SASRec's per-position BCE objective.

embedding -> dropout -> GRU -> linear. Left padding would feed the GRU leading zero vectors that still
move its state (biases), so each row is rotated to right padding, run as a packed sequence (the GRU sees
only real items), and rotated back: the output at a real position is exactly that of the unpadded run.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from allmrec.cf.base import SequentialCFModel


def _rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[b, j] = x[b, (j + shift[b]) % L] for x (B, L, d)."""
    L = x.shape[1]
    idx = (torch.arange(L, device=x.device)[None, :] + shift[:, None]) % L
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))


class GRU4Rec(SequentialCFModel):
    name: ClassVar[str] = "gru4rec"
    defaults: ClassVar[dict[str, Any]] = {"hidden": 50, "max_len": 50, "dropout": 0.2, "num_layers": 1}

    def __init__(self, n_items: int, n_users: int, cfg: dict[str, Any] | None = None):
        super().__init__(n_items, n_users, cfg)
        d, c = self.hidden, self.cfg
        if c["num_layers"] < 1:
            raise ValueError(f"gru4rec: num_layers must be >= 1, got {c['num_layers']}")
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.emb_drop = nn.Dropout(c["dropout"])
        self.gru = nn.GRU(d, d, num_layers=c["num_layers"], batch_first=True,
                          dropout=c["dropout"] if c["num_layers"] > 1 else 0.0)
        self.out = nn.Linear(d, d)  # GRU states live in (-1, 1); a linear map frees the logit scale
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        B, L = seqs.shape
        real = seqs != 0
        lengths = real.sum(1)
        shift = L - lengths  # number of leading pads
        x = _rotate(self.emb_drop(self.item_emb(seqs)), shift)  # now right-padded
        # an empty history is run as one padding step; its output is masked to zero below
        packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = self.gru(packed)
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=L)
        h = _rotate(h, -shift)  # back to left padding
        return self.out(h) * real.unsqueeze(-1).to(h.dtype)
