"""Rotary position embedding (half-split form) for absolute positions 0..n-1.

x [..., n, head_dim] turns pair (x[i], x[i + half]) by the angle of its position and frequency:
x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x[half:], x[:half]]. Written with autograd's
own operations, that is three slices, a negation and a concatenation whose backward fills a zero
tensor per slice and adds them up; here forward and backward are one product and two in-place
multiply-adds each. In a celp18 training step on one CPU thread the rotations' operations took
0.14 s against 0.40 s written with autograd's (per-operation timings, docs/performance.md). On a
CPU a rotation runs as one compiled pass where it can (kernels/cpu_fused.py); these operations are
its reference.
"""

from __future__ import annotations

import torch

from bakallm.kernels.cpu_fused import cpu_kernels_for


def rotary_tables(
    n_positions: int, head_dim: int, base: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [n_positions, head_dim], in float32."""
    inverse_frequency = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inverse_frequency)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin in the tables' precision, or with `inverse` the gradient's
    transposed rotation x * cos + R^T (x * sin), R^T [y1, y2] = [y2, -y1] the transpose of
    rotate_half; returned in x's dtype."""
    kernel = cpu_kernels_for(cos, sin)
    if kernel is not None and x.dtype == cos.dtype and x.dim() == 4 and x.stride(-1) == 1 and x.device == cos.device:
        return kernel.rotate(x, cos, sin, inverse)
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    rotated = x * cos
    if inverse:
        rotated[..., :half].addcmul_(second, sin[..., half:])
        rotated[..., half:].addcmul_(first, sin[..., :half], value=-1)
    else:
        rotated[..., :half].addcmul_(second, sin[..., :half], value=-1)
        rotated[..., half:].addcmul_(first, sin[..., half:])
    return rotated if rotated.dtype == x.dtype else rotated.to(x.dtype)


class _Rotation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, inverse=True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [..., n, head_dim] by the tables' rows [n, head_dim] (no gradient to the tables)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotation.apply(x, cos, sin)
    return _rotate(x, cos, sin, inverse=False)
