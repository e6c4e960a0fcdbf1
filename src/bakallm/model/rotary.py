"""Rotary position embedding (half-split form) for absolute positions 0..n-1."""

from __future__ import annotations

import torch


def rotary_tables(
    n_positions: int, head_dim: int, base: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [n_positions, head_dim], in float32."""
    inverse_frequency = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inverse_frequency)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [..., n, head_dim] by the tables' rows [n, head_dim]."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    rotated = x * cos + rotated_half * sin
    return rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)
