"""The Elephant activation `1 / (1 + |x/a|^d)` and the fused gate `up * elephant(gate)`.

The plain formula keeps several [tokens, d_ff] intermediates alive for backward (|x|, the power,
the reciprocal, ...). The fused gate keeps only its two inputs and recomputes the rest in
backward, which is cheap elementwise work.
"""

from __future__ import annotations

import torch


def elephant(x: torch.Tensor, a: float = 1.0, d: float = 8.0) -> torch.Tensor:
    """Reference formula, differentiated by autograd."""
    return 1.0 / (1.0 + (x / a).abs().pow(d))


def _scaled_power(x: torch.Tensor, a: float, d: float) -> torch.Tensor:
    """|x/a|^(d-1), by repeated squaring when d is a small even integer (the preset d=8)."""
    scaled = x / a if a != 1.0 else x
    if d == 8.0:
        square = scaled * scaled
        fourth = square * square
        return fourth * square * scaled.abs()
    return scaled.abs().pow(d - 1.0)


def _elephant_and_slope(x: torch.Tensor, a: float, d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Values f(x) and derivatives f'(x) = -d/a * sign(x) * |x/a|^(d-1) * f(x)^2."""
    power_minus_one = _scaled_power(x, a, d)
    power = power_minus_one * (x.abs() / a)
    value = 1.0 / (1.0 + power)
    slope = (-d / a) * torch.sign(x) * power_minus_one * value * value
    return value, slope


class _FusedElephantGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, up: torch.Tensor, gate: torch.Tensor, a: float, d: float) -> torch.Tensor:
        ctx.save_for_backward(up, gate)
        ctx.a, ctx.d = a, d
        with torch.no_grad():
            return up * elephant(gate, a, d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        up, gate = ctx.saved_tensors
        # At least float32 even under autocast: the slope has a large dynamic range.
        dtype = torch.promote_types(gate.dtype, torch.float32)
        value, slope = _elephant_and_slope(gate.to(dtype), ctx.a, ctx.d)
        grad_up = (grad_out.to(dtype) * value).to(up.dtype)
        grad_gate = (grad_out.to(dtype) * up.to(dtype) * slope).to(gate.dtype)
        return grad_up, grad_gate, None, None


def elephant_gate(up: torch.Tensor, gate: torch.Tensor, a: float = 1.0, d: float = 8.0, fused: bool = True) -> torch.Tensor:
    """`up * elephant(gate)`; `fused=False` runs the plain formula through autograd."""
    if fused and (up.requires_grad or gate.requires_grad):
        return _FusedElephantGate.apply(up, gate, a, d)
    return up * elephant(gate, a, d)
