"""NextItNet (Yuan et al., WSDM 2019): a stack of dilated causal 1-D convolutions with residuals.

Each residual block is conv(dilation r) -> LN -> ReLU -> conv(dilation 2r) -> LN -> ReLU, plus the input
(RecBole's block layout); `dilations` lists r per block (default 1, 4, 1, 4: the layers see 1, 2, 4, 8,
1, 2, 4, 8, a receptive field of 61 positions with kernel 3). Convolutions pad only on the left, so
position t never sees later items; padded positions are zeroed after every convolution, so real
positions see exactly the zeros of a run over the unpadded sequence.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from allmrec.cf.base import SequentialCFModel


class CausalConv(nn.Module):
    def __init__(self, d: int, kernel: int, dilation: int):
        super().__init__()
        self.left = (kernel - 1) * dilation
        self.conv = nn.Conv1d(d, d, kernel, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, L, d)
        return self.conv(F.pad(x.transpose(1, 2), (self.left, 0))).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, d: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv(d, kernel, dilation)
        self.ln1 = nn.LayerNorm(d)
        self.conv2 = CausalConv(d, kernel, 2 * dilation)
        self.ln2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.ln1(self.conv1(x))) * mask
        h = F.relu(self.ln2(self.conv2(h))) * mask
        return x + h


class NextItNet(SequentialCFModel):
    name: ClassVar[str] = "nextitnet"
    defaults: ClassVar[dict[str, Any]] = {"hidden": 50, "max_len": 50, "dropout": 0.2,
                                          "dilations": [1, 4, 1, 4], "kernel_size": 3}

    def __init__(self, n_items: int, n_users: int, cfg: dict[str, Any] | None = None):
        super().__init__(n_items, n_users, cfg)
        d, c = self.hidden, self.cfg
        if not c["dilations"] or min(c["dilations"]) < 1 or c["kernel_size"] < 2:
            raise ValueError(f"nextitnet: need dilations >= 1 (non-empty) and kernel_size >= 2, got {c}")
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.emb_drop = nn.Dropout(c["dropout"])
        self.blocks = nn.ModuleList(ResidualBlock(d, c["kernel_size"], r) for r in c["dilations"])
        nn.init.xavier_normal_(self.item_emb.weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        mask = (seqs != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.emb_drop(self.item_emb(seqs)) * mask
        for block in self.blocks:
            x = block(x, mask)
        return x
