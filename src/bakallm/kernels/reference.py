"""Mamba-1 selective scan, token by token: the reference every fast scan backend is tested against."""

from __future__ import annotations

import torch


def selective_scan_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain token-by-token recurrence, differentiated by autograd. x, dt: [Bt, T, Di];
    A: [Di, N]; B, C: [Bt, T, N]; D: [Di]; h0: [Bt, Di, N]."""
    h = h0
    outputs = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t, :, None] * A)
        h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(outputs, dim=1) + D * x
    return y, h


def scan_operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The fast scans' inputs as they compute on them: contiguous, in float32, or float64 when the
    first (x) is float64."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [tensor.to(dtype).contiguous() for tensor in tensors]
