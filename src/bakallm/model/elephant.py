"""The Elephant activation `1 / (1 + |x/a|^d)` and the fused gate `up * elephant(gate)`.

The plain formula keeps several [tokens, d_ff] intermediates alive for backward (x/a, |x/a|,
the reciprocal) and goes through `pow`, several times slower than a multiplication. The fused gate
keeps only its two inputs, recomputes the rest in backward, and builds every intermediate inside
its output buffers with in-place operations, so it allocates nothing beyond its results. When d is
a power of two (the preset d = 8), powers come from repeated squaring instead of `pow`. On a CPU,
forward and backward each run as one compiled pass where they can (kernels/cpu_fused.py); these
PyTorch operations are its reference.
"""

from __future__ import annotations

import torch

from bakallm.kernels.cpu_fused import cpu_kernels_for


def elephant(x: torch.Tensor, a: float = 1.0, d: float = 8.0) -> torch.Tensor:
    """Reference formula, differentiated by autograd."""
    return 1.0 / (1.0 + (x / a).abs().pow(d))


def _is_power_of_two(d: float) -> bool:
    return d >= 2 and float(d).is_integer() and (int(d) & (int(d) - 1)) == 0


def _power(x: torch.Tensor, d: float, out: torch.Tensor) -> torch.Tensor:
    """|x|^d into `out`."""
    if _is_power_of_two(d):
        torch.mul(x, x, out=out)
        for _ in range(int(d).bit_length() - 2):
            out.mul_(out)
        return out
    return torch.abs(x, out=out).pow_(d)


def _signed_power_below(x: torch.Tensor, d: float, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sign(x) |x|^(d-1) into `out`, overwriting `scratch`; for d = 2^k it is x * x^2 * x^4 * ..."""
    if not _is_power_of_two(d):
        return torch.abs(x, out=out).pow_(d - 1).copysign_(x)
    if d == 2:
        return out.copy_(x)
    torch.mul(x, x, out=scratch)
    torch.mul(scratch, x, out=out)
    for _ in range(int(d).bit_length() - 3):
        scratch.mul_(scratch)
        out.mul_(scratch)
    return out


def _fused_gate_values(up: torch.Tensor, gate: torch.Tensor, a: float, d: float) -> torch.Tensor:
    """`up * elephant(gate)` built in its output buffer."""
    kernel = cpu_kernels_for(up, gate)
    if kernel is not None:
        return kernel.elephant_gate_forward(up, gate, a, d)
    out = _power(gate, d, out=torch.empty_like(gate, dtype=torch.promote_types(up.dtype, gate.dtype)))
    if a != 1.0:
        out.mul_(a**-d)
    return torch.div(up, out.add_(1.0), out=out)


class _FusedElephantGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, up: torch.Tensor, gate: torch.Tensor, a: float, d: float) -> torch.Tensor:
        ctx.save_for_backward(up, gate)
        ctx.a, ctx.d = a, d
        return _fused_gate_values(up, gate, a, d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        up, gate = ctx.saved_tensors
        a, d = ctx.a, ctx.d
        kernel = cpu_kernels_for(grad_out, up, gate)
        if kernel is not None:
            grad_up, grad_gate = kernel.elephant_gate_backward(grad_out, up, gate, a, d)
            return grad_up, grad_gate, None, None
        # At least float32 even under autocast: the slope has a large dynamic range.
        dtype = torch.promote_types(gate.dtype, torch.float32)
        x = gate.to(dtype)
        grad_up, grad_gate = torch.empty_like(x), torch.empty_like(x)
        slope = _signed_power_below(x, d, out=grad_gate, scratch=grad_up)
        value = torch.mul(slope, x, out=grad_up)  # |x|^d, then f(x) = 1 / (1 + |x/a|^d)
        if a != 1.0:
            value.mul_(a**-d)
        value.add_(1.0).reciprocal_()
        # f'(x) = -d a^-d sign(x) |x|^(d-1) f(x)^2; the gate's gradient is dy * up * f'(x).
        slope.mul_(value)
        grad_up = value.mul_(grad_out)
        grad_gate = slope.mul_(grad_up).mul_(up).mul_(-d * a**-d)
        return grad_up.to(up.dtype), grad_gate.to(gate.dtype), None, None


def elephant_gate(
    up: torch.Tensor, gate: torch.Tensor, a: float = 1.0, d: float = 8.0, fused: bool = True
) -> torch.Tensor:
    """`up * elephant(gate)`; `fused=False` runs the plain formula through autograd."""
    if fused:
        if not (torch.is_grad_enabled() and (up.requires_grad or gate.requires_grad)):
            # Nothing to save for backward: the same values without the autograd.Function's call
            # (half of the gate's time on a decoded token).
            return _fused_gate_values(up, gate, a, d)
        return _FusedElephantGate.apply(up, gate, a, d)
    return up * elephant(gate, a, d)
