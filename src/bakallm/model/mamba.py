"""Mamba-1 mixer in pure PyTorch, with its convolution and SSM state carried in and out of a call.

input projection -> causal depthwise conv -> SiLU -> selective scan -> gated by SiLU(z) -> output
projection. The conv state is the last (d_conv - 1) conv inputs; the SSM state is h[T-1].
"""

from __future__ import annotations

import contextlib
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from bakallm.kernels.blocked import DEFAULT_BLOCK, DEFAULT_CHUNK
from bakallm.kernels.cpu_fused import cpu_kernels_for
from bakallm.kernels.reference import selective_scan_reference
from bakallm.kernels.scan import selective_scan


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without the call when it is a no-op: a decoded token runs these per layer."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _float(tensor: torch.Tensor) -> torch.Tensor:
    return _cast(tensor, torch.float32)


def _convolve(padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Depthwise causal convolution of padded [B, k-1 + L, d] (k-1 carried inputs, then L new ones)
    with weight [d, k] and bias [d], as k shifted multiply-adds: the same result as F.conv1d on
    [B, d, k-1 + L] without the transposes to and from that layout, which cost more than the
    convolution itself on a CPU. Returns [B, L, d]."""
    taps = weight.shape[1]
    length = padded.shape[1] - taps + 1
    out = torch.addcmul(bias, padded[:, :length], weight[:, 0])
    for tap in range(1, taps):
        out.addcmul_(padded[:, tap : tap + length], weight[:, tap])
    return out


def _next_conv_state(padded: torch.Tensor, taps: int) -> torch.Tensor:
    """The last k-1 inputs, the next conv state [B, d, k-1] in float32. Always a copy (never a view
    of `padded`, whatever its dtype and shape), so that the carried state does not keep the whole
    window's activations alive."""
    return (
        padded[:, padded.shape[1] - taps + 1 :]
        .transpose(1, 2)
        .to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    )


def _convolve_and_activate(
    padded: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: ModuleType | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SiLU(_convolve(...)) and the convolution before it: one pass of the compiled CPU `kernel`
    (kernels/cpu_fused.py), which keeps no convolution (None; its backward recomputes it), or
    PyTorch's operations."""
    if kernel is not None:
        return kernel.conv_silu_forward(padded, weight, bias), None
    before_activation = _convolve(padded, weight, bias)
    return F.silu(before_activation), before_activation


class _CausalConvolution(torch.autograd.Function):
    """`_convolve_and_activate` and the next conv state, with backward written out. The compiled
    CPU kernel recomputes the convolution in backward, in the same pass as its adjoint; the PyTorch
    path keeps it, and multiply-adds every shifted slice's gradient into one tensor (autograd's own
    fills a zero tensor the size of `padded` for each of the k slices and for the state's, then
    adds them up)."""

    @staticmethod
    def forward(ctx, padded, weight, bias):
        kernel = cpu_kernels_for(padded, weight, bias)
        out, before_activation = _convolve_and_activate(padded, weight, bias, kernel)
        ctx.kernel = kernel
        ctx.save_for_backward(padded, weight, bias, before_activation)
        return out, _next_conv_state(padded, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out, grad_state):
        padded, weight, bias, before_activation = ctx.saved_tensors
        taps, length = weight.shape[1], grad_out.shape[1]
        if ctx.kernel is not None:
            grad_padded, grad_weight, grad_bias = ctx.kernel.conv_silu_backward(
                grad_out.contiguous(), padded, weight, bias
            )
        else:
            grad = torch.ops.aten.silu_backward(grad_out, before_activation)
            grad_padded = torch.zeros_like(padded)
            for tap in range(taps):
                grad_padded[:, tap : tap + length].addcmul_(grad, weight[:, tap])
            grad_weight = torch.stack(
                [(grad * padded[:, tap : tap + length]).sum((0, 1)) for tap in range(taps)], dim=1
            )
            grad_bias = grad.sum((0, 1))
        if grad_state is not None:
            grad_padded[:, length:] += grad_state.transpose(1, 2)
        needs = ctx.needs_input_grad
        return tuple(grad if need else None for grad, need in zip((grad_padded, grad_weight, grad_bias), needs))


class Mamba(nn.Module):
    def __init__(
        self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank: int = 0, dt_min: float = 1e-3
    ):
        super().__init__()
        self.dt_min = dt_min
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        # The scan backend, one of bakallm.kernels.SCAN_BACKENDS; set from outside the model
        # (bakallm.acceleration.use_scan_backend).
        self.scan = "auto"
        # Steps per block and per sub-chunk of the blocked scan; larger ones mean fewer, larger
        # operations (what a GPU wants) and more memory (see docs/performance.md).
        self.scan_block = DEFAULT_BLOCK
        self.scan_chunk = DEFAULT_CHUNK
        self.reset_dt_projection()

    def reset_dt_projection(self, dt_max: float = 0.1) -> None:
        """Mamba's initialisation: small uniform weights, softplus(bias) log-uniform in [self.dt_min, dt_max]."""
        with torch.no_grad():
            bound = self.dt_rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            dt = torch.exp(
                torch.rand(self.d_inner) * (math.log(dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
            )
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def initial_state(self, batch_size: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero (conv, ssm) states: [B, d_inner, d_conv-1] and [B, d_inner, d_state], float32."""
        conv = torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device)
        ssm = torch.zeros(batch_size, self.d_inner, self.d_state, device=device)
        return conv, ssm

    def forward(
        self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, sequential: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, L, d_model] -> (y [B, L, d_model], new conv_state, new ssm_state).

        `sequential`: scan token by token (the reference recurrence) instead of with the chosen
        backend; for the few positions of a decoding step (a pause and its token, a window's read
        memory, its write slots), where a fast scan's fixed cost is many times the work."""
        hidden, gate = self.in_proj(x).chunk(2, dim=-1)
        hidden, new_conv_state = self._causal_conv(hidden, conv_state)
        dt_low_rank, B, C = self.x_proj(hidden).split((self.dt_rank, self.d_state, self.d_state), dim=-1)
        dt = F.softplus(self.dt_proj(dt_low_rank).float())
        A = -torch.exp(self.A_log.float())
        with torch.autocast(device_type=x.device.type, enabled=False):
            args = (hidden.float(), dt, A, B.float(), C.float(), self.D.float(), ssm_state.float())
            if sequential:
                y, new_ssm_state = selective_scan_reference(*args)
            else:
                y, new_ssm_state = selective_scan(
                    *args, backend=self.scan, block=self.scan_block, chunk=self.scan_chunk
                )
        y = y.to(gate.dtype) * F.silu(gate)
        return self.out_proj(y), new_conv_state, new_ssm_state

    def step(
        self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position, x [B, 1, d_model]: what `forward` gives for it, as a direct update of the
        conv and SSM states instead of a scan (for token-by-token decoding). The returned conv state
        may be a view of a slightly larger tensor; the window runtime makes the state it commits
        contiguous.

        A decoded token's time here is mostly per-call overhead, so this path calls F.linear on
        the layers' weights (forward hooks on in_proj, x_proj, dt_proj and out_proj see `forward`
        only), slices instead of chunk/split, and vecdot for the two short sums."""
        d_inner, rank, d_state = self.d_inner, self.dt_rank, self.d_state
        projected = F.linear(x[:, 0], self.in_proj.weight)
        hidden, gate = projected[:, :d_inner], projected[:, d_inner:]
        dtype = hidden.dtype
        conv_window = torch.cat((_cast(conv_state, dtype), hidden.unsqueeze(-1)), dim=-1)  # [B, d_inner, d_conv]
        hidden = F.silu(
            torch.linalg.vecdot(conv_window, _cast(self.conv.weight[:, 0], dtype)) + _cast(self.conv.bias, dtype)
        )
        new_conv_state = _float(conv_window[:, :, 1:])
        projected = F.linear(hidden, self.x_proj.weight)
        dt = F.softplus(_float(F.linear(projected[:, :rank], self.dt_proj.weight, self.dt_proj.bias)))
        B, C = projected[:, rank : rank + d_state], projected[:, rank + d_state :]
        A = -torch.exp(_float(self.A_log))
        with (
            torch.autocast(device_type=x.device.type, enabled=False)
            if torch.is_autocast_enabled(x.device.type)
            else contextlib.nullcontext()
        ):
            hidden = _float(hidden)
            decay = torch.exp(dt.unsqueeze(-1) * A)
            # addcmul: a product and a sum in one operator call (fused, so its last bit may differ).
            new_ssm_state = torch.addcmul(
                decay * _float(ssm_state), (dt * hidden).unsqueeze(-1), _float(B).unsqueeze(1)
            )
            y = torch.addcmul(torch.linalg.vecdot(new_ssm_state, _float(C).unsqueeze(1)), _float(self.D), hidden)
        y = _cast(y, gate.dtype) * F.silu(gate)
        return F.linear(y, self.out_proj.weight).unsqueeze(1), new_conv_state, new_ssm_state

    def _causal_conv(self, hidden: torch.Tensor, conv_state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SiLU of the depthwise causal convolution of hidden [B, L, d_inner] after the carried
        inputs conv_state [B, d_inner, d_conv-1]; returns it and the next conv state."""
        padded = torch.cat((conv_state.transpose(1, 2).to(hidden.dtype), hidden), dim=1)
        weight = self.conv.weight.squeeze(1).to(hidden.dtype)
        bias = self.conv.bias.to(hidden.dtype)
        if torch.is_grad_enabled() and any(tensor.requires_grad for tensor in (padded, weight, bias)):
            return _CausalConvolution.apply(padded, weight, bias)
        out, _ = _convolve_and_activate(padded, weight, bias, cpu_kernels_for(padded, weight, bias))
        return out, _next_conv_state(padded, self.d_conv)
