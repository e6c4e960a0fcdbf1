"""Gated MLP with the Elephant gate: `down(up(h) * elephant(gate(h)))`, bias-free."""

from __future__ import annotations

import torch
from torch import nn

from bakallm.model.elephant import elephant_gate


class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, a: float = 1.0, d: float = 8.0, fused: bool = True):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.a, self.d, self.fused = a, d, fused

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # On rows [N, d]: a linear layer on a 3-D input reshapes it to 2-D and back, three more
        # operator calls each, which token-by-token decoding notices. The same products.
        rows = h.reshape(-1, h.shape[-1])
        out = self.down(elephant_gate(self.up(rows), self.gate(rows), self.a, self.d, fused=self.fused))
        return out.view(*h.shape[:-1], out.shape[-1])
