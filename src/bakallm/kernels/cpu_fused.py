"""Fused passes for CPUs (cpu_fused.cpp): the Elephant gate, Mamba's causal convolution with its
SiLU, RMSNorm and the rotary embedding, each one pass through memory forward and one backward,
where PyTorch's operations take several. The model's modules call them where `cpu_kernels_for`
allows, and run their PyTorch operations (the references, and what a GPU runs) otherwise.

Functions of the compiled module (all tensors contiguous, of one dtype, float32 or float64):
- `elephant_gate_forward(up, gate, a, d)` -> up * elephant(gate), model/elephant.py;
  `elephant_gate_backward(grad, up, gate, a, d)` -> (grad_up, grad_gate).
- `conv_silu_forward(padded, weight, bias)` -> silu(the causal depthwise convolution of padded
  [B, k-1 + L, d] with weight [d, k] and bias [d]), [B, L, d], model/mamba.py;
  `conv_silu_backward(grad, padded, weight, bias)` -> (grad_padded, grad_weight, grad_bias).
- `rms_norm_forward(x, weight, eps)` -> (y, 1/rms of each row), over x's last dimension,
  model/network.py; `rms_norm_backward(grad, x, weight, rstd)` -> (grad_x, grad_weight).
- `rotate(x, cos, sin, inverse)` -> x [B, H, n, head_dim] (last stride 1) rotated by the tables
  [n, head_dim], or by the transposed rotation, contiguous, model/rotary.py.
"""

from __future__ import annotations

from types import ModuleType

import torch

from bakallm.kernels.cpu_build import compiled_module

FUSED_DTYPES = (torch.float32, torch.float64)


def cpu_kernels_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The compiled CPU kernels when they can take these tensors: on the CPU, contiguous, of one
    dtype in FUSED_DTYPES, and the kernels built; None otherwise, and while torch.compile traces
    (their calls are opaque to it, and inductor fuses the PyTorch operations itself)."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in FUSED_DTYPES or torch.compiler.is_compiling():
        return None
    if any(tensor.dtype != first.dtype or not tensor.is_contiguous() for tensor in tensors):
        return None
    module = compiled_module()
    return None if isinstance(module, str) else module
