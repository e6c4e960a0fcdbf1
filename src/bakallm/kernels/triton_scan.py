"""Mamba-1 selective scan in Triton, with the state carried in and out (see reference.py).

One program owns one row and a block of BLOCK_D channels, holds their [BLOCK_D, d_state] state in
float32, and walks the sequence TILE steps at a time. Per tile it loads the tile's inputs with one
coalesced load each ([TILE, BLOCK_D] of x and dt, [TILE, d_state] of B and C), forms the step
factors a = exp(dt A) and b = dt x B as [TILE, BLOCK_D, d_state] tensors in registers, and solves
the tile's recurrence h[t] = a[t] h[t-1] + b[t] with a parallel associative scan along time; the
state entering the tile is then added as (product of a up to t) * h_in. The state is never written
to memory except at the start of every tile (forward, only when gradients are needed), so no
[B, T, d_inner, d_state] tensor exists.

Backward walks the tiles from the last to the first. For each tile it reloads the tile's inputs and
its starting state, recomputes the tile's states with the same scan, and solves the state gradient
g[t] = C[t] dy[t] + a[t+1] g[t+1] with a reverse associative scan, the gradient arriving from the
later tiles (or from the final state) added as (product of a after t) * g_in. Everything else (the
gradients of x, dt, A, B, C and D) is elementwise or a sum over one axis of those tiles; what flows
out of the first step is the gradient of h0. The gradients of B and C sum over channels, so each channel block writes its part and the
parts are summed afterwards (deterministic, unlike atomics); A and D sum over rows the same way.

Both passes are custom operators (torch.library), so torch.compile keeps them in its graph as
opaque calls instead of breaking the graph around the scan. Inputs may be float32 or bfloat16;
states and accumulations are float32, outputs and gradients take their input's dtype.

On a CPU the kernels only run under Triton's interpreter (TRITON_INTERPRET=1 set before this
module is imported), which the tests use.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Whether the kernels were built for Triton's interpreter, which runs them on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Steps solved at once by one scan; the forward pass keeps the state at the start of each tile
# (1/TILE of a [B, T, d_inner, d_state] tensor) for the backward pass.
TILE = 16
MAX_BLOCK_D = 16
NUM_WARPS = 8


@triton.jit
def _linear_recurrence(a_before, b_before, a_after, b_after):
    """Two consecutive steps h -> a h + b as one: h -> a_after (a_before h + b_before) + b_after."""
    return a_before * a_after, a_after * b_before + b_after


@triton.jit
def _scan_3d(a, b, TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, REVERSE: tl.constexpr):
    """The associative scan of the steps (a, b) [TILE, BLOCK_D, BLOCK_N] along time, done on their
    [TILE, BLOCK_D * BLOCK_N] view: the two-dimensional scan along axis 0 is Triton's common case."""
    a_scanned, b_scanned = tl.associative_scan(
        (tl.reshape(a, (TILE, BLOCK_D * BLOCK_N)), tl.reshape(b, (TILE, BLOCK_D * BLOCK_N))),
        0,
        _linear_recurrence,
        reverse=REVERSE,
    )
    return tl.reshape(a_scanned, (TILE, BLOCK_D, BLOCK_N)), tl.reshape(b_scanned, (TILE, BLOCK_D, BLOCK_N))


@triton.jit
def _scan_forward_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    h0_ptr,
    y_ptr,
    h_last_ptr,
    checkpoints_ptr,
    length,
    d_inner,
    d_state,
    n_tiles,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, TILE)
    channel_mask = channels < d_inner
    state_mask = states < d_state
    matrix_mask = channel_mask[:, None] & state_mask[None, :]
    matrix = channels[:, None] * d_state + states[None, :]

    A = tl.load(A_ptr + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    h = tl.load(h0_ptr + row * d_inner * d_state + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    sequence = row * length * d_inner
    projections = row * length * d_state
    for tile in range(n_tiles):
        if SAVE_CHECKPOINTS:
            tl.store(checkpoints_ptr + (row * n_tiles + tile) * d_inner * d_state + matrix, h, mask=matrix_mask)
        t = tile * TILE + steps
        # Steps past the end load dt = 0, x = 0: a = 1, b = 0, so they carry the last state unchanged.
        in_sequence = t < length
        per_channel = sequence + t[:, None] * d_inner + channels[None, :]
        per_channel_mask = in_sequence[:, None] & channel_mask[None, :]
        per_state = projections + t[:, None] * d_state + states[None, :]
        per_state_mask = in_sequence[:, None] & state_mask[None, :]
        x = tl.load(x_ptr + per_channel, mask=per_channel_mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + per_channel, mask=per_channel_mask, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + per_state, mask=per_state_mask, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + per_state, mask=per_state_mask, other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, :, None] * A[None, :, :])
        decay_so_far, h_from_zero = _scan_3d(decay, (dt * x)[:, :, None] * B[:, None, :], TILE, BLOCK_D, BLOCK_N, False)
        h_tile = decay_so_far * h[None, :, :] + h_from_zero
        y = tl.sum(h_tile * C[:, None, :], axis=2) + D[None, :] * x
        tl.store(y_ptr + per_channel, y.to(y_ptr.dtype.element_ty), mask=per_channel_mask)
        h = tl.sum(tl.where(steps[:, None, None] == TILE - 1, h_tile, 0.0), axis=0)
    tl.store(h_last_ptr + row * d_inner * d_state + matrix, h, mask=matrix_mask)


@triton.jit
def _scan_backward_kernel(
    x_ptr,
    dt_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    checkpoints_ptr,
    grad_y_ptr,
    grad_h_last_ptr,
    grad_x_ptr,
    grad_dt_ptr,
    grad_A_parts_ptr,
    grad_B_parts_ptr,
    grad_C_parts_ptr,
    grad_D_parts_ptr,
    grad_h0_ptr,
    length,
    d_inner,
    d_state,
    n_tiles,
    batch,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    channel_block = tl.program_id(1)
    channels = channel_block * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    steps = tl.arange(0, TILE)
    channel_mask = channels < d_inner
    state_mask = states < d_state
    matrix_mask = channel_mask[:, None] & state_mask[None, :]
    matrix = channels[:, None] * d_state + states[None, :]

    A = tl.load(A_ptr + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    # dL/dh at the end of the tile being processed, from everything after it.
    grad_h = tl.load(grad_h_last_ptr + row * d_inner * d_state + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    grad_A = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sequence = row * length * d_inner
    projections = row * length * d_state
    # The parts of grad B and grad C written by this channel block: [channel blocks, batch, T, N].
    parts = (channel_block * batch + row) * length * d_state
    for reversed_tile in range(n_tiles):
        tile = n_tiles - 1 - reversed_tile
        h_start = tl.load(
            checkpoints_ptr + (row * n_tiles + tile) * d_inner * d_state + matrix, mask=matrix_mask, other=0.0
        )
        t = tile * TILE + steps
        in_sequence = t < length
        per_channel_mask = in_sequence[:, None] & channel_mask[None, :]
        per_state_mask = in_sequence[:, None] & state_mask[None, :]
        per_channel = sequence + t[:, None] * d_inner + channels[None, :]
        per_state = projections + t[:, None] * d_state + states[None, :]
        x = tl.load(x_ptr + per_channel, mask=per_channel_mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + per_channel, mask=per_channel_mask, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + per_channel, mask=per_channel_mask, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + per_state, mask=per_state_mask, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + per_state, mask=per_state_mask, other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, :, None] * A[None, :, :])
        dt_x = dt * x
        step_input = dt_x[:, :, None] * B[:, None, :]
        decay_so_far, h_from_zero = _scan_3d(decay, step_input, TILE, BLOCK_D, BLOCK_N, False)
        h_after = decay_so_far * h_start[None, :, :] + h_from_zero
        # g[t] = C[t] dy[t] + a[t + 1] g[t + 1] inside the tile; the last step also gets grad_h.
        has_after = (steps[:, None] < TILE - 1) & ((t[:, None] + 1) < length) & channel_mask[None, :]
        dt_after = tl.load(dt_ptr + per_channel + d_inner, mask=has_after, other=0.0).to(tl.float32)
        decay_after, grad_from_tile = _scan_3d(
            tl.exp(dt_after[:, :, None] * A[None, :, :]),
            grad_y[:, :, None] * C[:, None, :],
            TILE,
            BLOCK_D,
            BLOCK_N,
            True,
        )
        grad_h_tile = grad_from_tile + decay_after * grad_h[None, :, :]  # dL/dh[t]
        tl.store(
            grad_C_parts_ptr + parts + t[:, None] * d_state + states[None, :],
            tl.sum(h_after * grad_y[:, :, None], axis=1),
            mask=per_state_mask,
        )
        tl.store(
            grad_B_parts_ptr + parts + t[:, None] * d_state + states[None, :],
            tl.sum(grad_h_tile * dt_x[:, :, None], axis=1),
            mask=per_state_mask,
        )
        grad_dt_x = tl.sum(grad_h_tile * B[:, None, :], axis=2)
        # dL/d(dt[t] A) = g[t] a[t] h[t-1], and a[t] h[t-1] = h[t] - b[t]: no shifted states needed.
        grad_dt_A = grad_h_tile * (h_after - step_input)
        grad_A += tl.sum(grad_dt_A * dt[:, :, None], axis=0)
        grad_D += tl.sum(grad_y * x, axis=0)
        grad_dt = tl.sum(grad_dt_A * A[None, :, :], axis=2) + grad_dt_x * x
        grad_x = grad_dt_x * dt + grad_y * D[None, :]
        tl.store(grad_x_ptr + per_channel, grad_x.to(grad_x_ptr.dtype.element_ty), mask=per_channel_mask)
        tl.store(grad_dt_ptr + per_channel, grad_dt.to(grad_dt_ptr.dtype.element_ty), mask=per_channel_mask)
        # What flows into the state before the tile: dL/dh at its first step, through that step's decay.
        grad_h = tl.sum(tl.where(steps[:, None, None] == 0, grad_h_tile * decay, 0.0), axis=0)
    tl.store(grad_h0_ptr + row * d_inner * d_state + matrix, grad_h.to(grad_h0_ptr.dtype.element_ty), mask=matrix_mask)
    tl.store(grad_A_parts_ptr + row * d_inner * d_state + matrix, grad_A, mask=matrix_mask)
    tl.store(grad_D_parts_ptr + row * d_inner + channels, grad_D, mask=channel_mask)


def _blocks(d_inner: int, d_state: int) -> tuple[int, int]:
    return min(MAX_BLOCK_D, triton.next_power_of_2(d_inner)), triton.next_power_of_2(d_state)


@torch.library.custom_op("bakallm::selective_scan_forward", mutates_args=())
def _forward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h_last float32, checkpoints [batch, n_tiles, d_inner, d_state] float32, empty unless saved)."""
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    n_tiles = triton.cdiv(length, TILE)
    y = torch.empty_like(x)
    h_last = torch.empty(batch, d_inner, d_state, device=x.device, dtype=torch.float32)
    checkpoints = torch.empty(
        batch, n_tiles if save_checkpoints else 0, d_inner, d_state, device=x.device, dtype=torch.float32
    )
    block_d, block_n = _blocks(d_inner, d_state)
    _scan_forward_kernel[(batch, triton.cdiv(d_inner, block_d))](
        # Without checkpoints the kernel never touches their pointer; an empty tensor's may be null.
        x,
        dt,
        A,
        B,
        C,
        D,
        h0,
        y,
        h_last,
        checkpoints if save_checkpoints else h_last,
        length,
        d_inner,
        d_state,
        n_tiles,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        TILE=TILE,
        SAVE_CHECKPOINTS=save_checkpoints,
        num_warps=NUM_WARPS,
    )
    return y, h_last, checkpoints


@_forward.register_fake
def _(x, dt, A, B, C, D, h0, save_checkpoints):
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    n_tiles = -(-length // TILE) if save_checkpoints else 0
    return (
        torch.empty_like(x),
        x.new_empty(batch, d_inner, d_state, dtype=torch.float32),
        x.new_empty(batch, n_tiles, d_inner, d_state, dtype=torch.float32),
    )


@torch.library.custom_op("bakallm::selective_scan_backward", mutates_args=())
def _backward(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
    checkpoints: torch.Tensor,
    grad_y: torch.Tensor,
    grad_h_last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, dt, A, B, C, D and h0, each in its input's dtype."""
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    block_d, block_n = _blocks(d_inner, d_state)
    channel_blocks = triton.cdiv(d_inner, block_d)
    float32 = {"device": x.device, "dtype": torch.float32}
    grad_x, grad_dt = torch.empty_like(x), torch.empty_like(dt)
    grad_h0 = torch.empty_like(h0)
    grad_A_parts = torch.empty(batch, d_inner, d_state, **float32)
    grad_B_parts = torch.empty(channel_blocks, batch, length, d_state, **float32)
    grad_C_parts = torch.empty(channel_blocks, batch, length, d_state, **float32)
    grad_D_parts = torch.empty(batch, d_inner, **float32)
    _scan_backward_kernel[(batch, channel_blocks)](
        x,
        dt,
        A,
        B,
        C,
        D,
        checkpoints,
        grad_y,
        grad_h_last,
        grad_x,
        grad_dt,
        grad_A_parts,
        grad_B_parts,
        grad_C_parts,
        grad_D_parts,
        grad_h0,
        length,
        d_inner,
        d_state,
        checkpoints.shape[1],
        batch,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        TILE=TILE,
        num_warps=NUM_WARPS,
    )
    return (
        grad_x,
        grad_dt,
        grad_A_parts.sum(0).to(A.dtype),
        grad_B_parts.sum(0).to(B.dtype),
        grad_C_parts.sum(0).to(C.dtype),
        grad_D_parts.sum(0).to(D.dtype),
        grad_h0,
    )


@_backward.register_fake
def _(x, dt, A, B, C, D, h0, checkpoints, grad_y, grad_h_last):
    return tuple(torch.empty_like(t) for t in (x, dt, A, B, C, D, h0))


class _TritonSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0):
        y, h_last, checkpoints = _forward(x, dt, A, B, C, D, h0, any(ctx.needs_input_grad))
        ctx.save_for_backward(x, dt, A, B, C, D, h0, checkpoints)
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, D, h0, checkpoints = ctx.saved_tensors
        return _backward(x, dt, A, B, C, D, h0, checkpoints, grad_y.contiguous(), grad_h_last.contiguous())


def selective_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's signature and results (y in x's dtype, the final state in float32), on CUDA
    tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    return _TritonSelectiveScan.apply(*(t.contiguous() for t in (x, dt, A, B, C, D, h0)))
