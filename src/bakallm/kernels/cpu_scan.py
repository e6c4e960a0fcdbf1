"""The selective scan as one compiled C++ loop per block of channels, for CPUs (cpu_scan.cpp).

The blocked scan (blocked.py) runs thousands of small PyTorch operations per window; on a CPU
each costs microseconds of dispatch and a pass through memory. This kernel keeps a block of
channels' states in a local array, one channel per vector lane, and does a step in a few vector
instructions per state; forward keeps the state entering every 16th step, backward recomputes
each 16-step segment from it and runs the adjoint recurrence through it (the maths is in the .cpp
file's comments; the reference is reference.py).

It is built with the other CPU kernels on first use (kernels/cpu_build.py). Where it cannot be
built, the scan backend "auto" falls back to the blocked scan, as it does when the kernel's results
differ from the reference scan's (kernels/scan.py, `self_check_failure`).
"""

from __future__ import annotations

import torch

from bakallm.kernels.cpu_build import compiled_module
from bakallm.kernels.reference import scan_operands


class _CpuSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0):
        kernel = compiled_module()
        needs_gradients = any(ctx.needs_input_grad)
        y, h_last, checkpoints = kernel.scan_forward(x, dt, A, B, C, D, h0, needs_gradients)
        if needs_gradients:
            ctx.save_for_backward(x, dt, A, B, C, D, checkpoints)
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, D, checkpoints = ctx.saved_tensors
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous().to(x.dtype)
        grad_h_last = (
            torch.zeros(x.shape[0], *A.shape, dtype=x.dtype) if grad_h_last is None else grad_h_last.contiguous()
        )
        return tuple(compiled_module().scan_backward(x, dt, A, B, C, D, checkpoints, grad_y, grad_h_last.to(x.dtype)))


# Runs eagerly inside compiled models, as the blocked scan does.
@torch.compiler.disable
def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled scan with the reference's signature; computes in float32, or float64 for
    float64 inputs. Call `compiled_module()` first where a failed build must be handled."""
    tensors = scan_operands(x, dt, A, B, C, D, h0)
    return _CpuSelectiveScan.apply(*tensors)
