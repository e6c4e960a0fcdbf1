"""Mamba-1 selective scan in Triton, with the state carried in and out (see reference.py).

One program owns one row and a block of BLOCK_D channels, holds their [BLOCK_D, d_state] state in
registers in float32, and walks the sequence one step at a time: the state is never written to
memory except at a checkpoint every CHECKPOINT_EVERY steps (forward) and in a per-program scratch
of one chunk's states (backward), so no [B, T, d_inner, d_state] tensor exists.

Backward walks the checkpointed chunks from the last to the first. For each chunk it recomputes the
chunk's states from its checkpoint into the program's scratch (CHECKPOINT_EVERY + 1 states, small
enough to stay in the GPU's L2 cache), then runs the state gradient backwards through the chunk,
turning it into the gradients of x, dt, A, B, C and D as it goes; what is left at the first step is
the gradient of h0. The gradients of B and C sum over channels, so each channel block writes its
part and the parts are summed afterwards (deterministic, unlike atomics); A and D sum over rows
the same way.

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
CHECKPOINT_EVERY = 64
MAX_BLOCK_D = 32


@triton.jit
def _scan_forward_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr,
    y_ptr, h_last_ptr, checkpoints_ptr,
    length, d_inner, d_state, n_checkpoints,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    channel_mask = channels < d_inner
    state_mask = states < d_state
    matrix_mask = channel_mask[:, None] & state_mask[None, :]
    matrix = channels[:, None] * d_state + states[None, :]

    A = tl.load(A_ptr + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    h = tl.load(h0_ptr + row * d_inner * d_state + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    sequence = row * length * d_inner
    projections = row * length * d_state
    for t in range(length):
        if SAVE_CHECKPOINTS:
            if t % CHUNK == 0:
                checkpoint = (row * n_checkpoints + t // CHUNK) * d_inner * d_state
                tl.store(checkpoints_ptr + checkpoint + matrix, h, mask=matrix_mask)
        x = tl.load(x_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
        B = tl.load(B_ptr + projections + t * d_state + states, mask=state_mask, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + projections + t * d_state + states, mask=state_mask, other=0.0).to(tl.float32)
        h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B[None, :]
        y = tl.sum(h * C[None, :], axis=1) + D * x
        tl.store(y_ptr + sequence + t * d_inner + channels, y.to(y_ptr.dtype.element_ty), mask=channel_mask)
    tl.store(h_last_ptr + row * d_inner * d_state + matrix, h, mask=matrix_mask)


@triton.jit
def _scan_backward_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, checkpoints_ptr, grad_y_ptr, grad_h_last_ptr, scratch_ptr,
    grad_x_ptr, grad_dt_ptr, grad_A_parts_ptr, grad_B_parts_ptr, grad_C_parts_ptr, grad_D_parts_ptr, grad_h0_ptr,
    length, d_inner, d_state, n_checkpoints, batch,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    channel_block = tl.program_id(1)
    channels = channel_block * BLOCK_D + tl.arange(0, BLOCK_D)
    states = tl.arange(0, BLOCK_N)
    channel_mask = channels < d_inner
    state_mask = states < d_state
    matrix_mask = channel_mask[:, None] & state_mask[None, :]
    matrix = channels[:, None] * d_state + states[None, :]
    # scratch[i] is the state before step i of the chunk, scratch[i + 1] the state after it.
    scratch = scratch_ptr + (row * tl.num_programs(1) + channel_block) * (CHUNK + 1) * BLOCK_D * BLOCK_N
    scratch_matrix = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + states[None, :]

    A = tl.load(A_ptr + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + channels, mask=channel_mask, other=0.0).to(tl.float32)
    grad_h = tl.load(grad_h_last_ptr + row * d_inner * d_state + matrix, mask=matrix_mask, other=0.0).to(tl.float32)
    grad_A = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    grad_D = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sequence = row * length * d_inner
    projections = row * length * d_state
    # The parts of grad B and grad C written by this channel block: [channel blocks, batch, T, N].
    parts = (channel_block * batch + row) * length * d_state
    for reversed_chunk in range(n_checkpoints):
        chunk = n_checkpoints - 1 - reversed_chunk
        start = chunk * CHUNK
        steps = tl.minimum(length - start, CHUNK)
        h = tl.load(checkpoints_ptr + (row * n_checkpoints + chunk) * d_inner * d_state + matrix, mask=matrix_mask, other=0.0)
        tl.store(scratch + scratch_matrix, h)
        for i in range(steps):
            t = start + i
            x = tl.load(x_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
            B = tl.load(B_ptr + projections + t * d_state + states, mask=state_mask, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B[None, :]
            tl.store(scratch + (i + 1) * BLOCK_D * BLOCK_N + scratch_matrix, h)
        tl.debug_barrier()
        for reversed_step in range(steps):
            i = steps - 1 - reversed_step
            t = start + i
            x = tl.load(x_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
            dt = tl.load(dt_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
            grad_y = tl.load(grad_y_ptr + sequence + t * d_inner + channels, mask=channel_mask, other=0.0).to(tl.float32)
            B = tl.load(B_ptr + projections + t * d_state + states, mask=state_mask, other=0.0).to(tl.float32)
            C = tl.load(C_ptr + projections + t * d_state + states, mask=state_mask, other=0.0).to(tl.float32)
            h_after = tl.load(scratch + (i + 1) * BLOCK_D * BLOCK_N + scratch_matrix)
            h_before = tl.load(scratch + i * BLOCK_D * BLOCK_N + scratch_matrix)
            grad_h += grad_y[:, None] * C[None, :]  # now dL/dh[t]
            tl.store(grad_C_parts_ptr + parts + t * d_state + states, tl.sum(h_after * grad_y[:, None], axis=0), mask=state_mask)
            tl.store(grad_B_parts_ptr + parts + t * d_state + states, tl.sum(grad_h * (dt * x)[:, None], axis=0), mask=state_mask)
            grad_dt_x = tl.sum(grad_h * B[None, :], axis=1)
            decay = tl.exp(dt[:, None] * A)
            grad_dt_A = grad_h * decay * h_before  # dL/d(dt[t] A)
            grad_A += grad_dt_A * dt[:, None]
            grad_D += grad_y * x
            grad_dt = tl.sum(grad_dt_A * A, axis=1) + grad_dt_x * x
            grad_x = grad_dt_x * dt + grad_y * D
            tl.store(grad_x_ptr + sequence + t * d_inner + channels, grad_x.to(grad_x_ptr.dtype.element_ty), mask=channel_mask)
            tl.store(grad_dt_ptr + sequence + t * d_inner + channels, grad_dt.to(grad_dt_ptr.dtype.element_ty), mask=channel_mask)
            grad_h = grad_h * decay  # now the part of dL/dh[t-1] that flows through h[t]
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(grad_h0_ptr + row * d_inner * d_state + matrix, grad_h.to(grad_h0_ptr.dtype.element_ty), mask=matrix_mask)
    tl.store(grad_A_parts_ptr + row * d_inner * d_state + matrix, grad_A, mask=matrix_mask)
    tl.store(grad_D_parts_ptr + row * d_inner + channels, grad_D, mask=channel_mask)


def _blocks(d_inner: int, d_state: int) -> tuple[int, int]:
    return min(MAX_BLOCK_D, triton.next_power_of_2(d_inner)), triton.next_power_of_2(d_state)


@torch.library.custom_op("bakallm::selective_scan_forward", mutates_args=())
def _forward(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, h0: torch.Tensor,
    save_checkpoints: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h_last float32, checkpoints [batch, n_chunks, d_inner, d_state] float32, empty unless saved)."""
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    n_checkpoints = triton.cdiv(length, CHECKPOINT_EVERY) if save_checkpoints else 0
    y = torch.empty_like(x)
    h_last = torch.empty(batch, d_inner, d_state, device=x.device, dtype=torch.float32)
    checkpoints = torch.empty(batch, n_checkpoints, d_inner, d_state, device=x.device, dtype=torch.float32)
    block_d, block_n = _blocks(d_inner, d_state)
    _scan_forward_kernel[(batch, triton.cdiv(d_inner, block_d))](
        # Without checkpoints the kernel never touches their pointer; an empty tensor's may be null.
        x, dt, A, B, C, D, h0, y, h_last, checkpoints if save_checkpoints else h_last,
        length, d_inner, d_state, n_checkpoints,
        BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=CHECKPOINT_EVERY, SAVE_CHECKPOINTS=save_checkpoints,
    )
    return y, h_last, checkpoints


@_forward.register_fake
def _(x, dt, A, B, C, D, h0, save_checkpoints):
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    n_checkpoints = -(-length // CHECKPOINT_EVERY) if save_checkpoints else 0
    return (
        torch.empty_like(x),
        x.new_empty(batch, d_inner, d_state, dtype=torch.float32),
        x.new_empty(batch, n_checkpoints, d_inner, d_state, dtype=torch.float32),
    )


@torch.library.custom_op("bakallm::selective_scan_backward", mutates_args=())
def _backward(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, h0: torch.Tensor,
    checkpoints: torch.Tensor, grad_y: torch.Tensor, grad_h_last: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, dt, A, B, C, D and h0, each in its input's dtype."""
    batch, length, d_inner = x.shape
    d_state = A.shape[1]
    block_d, block_n = _blocks(d_inner, d_state)
    channel_blocks = triton.cdiv(d_inner, block_d)
    float32 = {"device": x.device, "dtype": torch.float32}
    scratch = torch.empty(batch * channel_blocks * (CHECKPOINT_EVERY + 1) * block_d * block_n, **float32)
    grad_x, grad_dt = torch.empty_like(x), torch.empty_like(dt)
    grad_h0 = torch.empty_like(h0)
    grad_A_parts = torch.empty(batch, d_inner, d_state, **float32)
    grad_B_parts = torch.empty(channel_blocks, batch, length, d_state, **float32)
    grad_C_parts = torch.empty(channel_blocks, batch, length, d_state, **float32)
    grad_D_parts = torch.empty(batch, d_inner, **float32)
    _scan_backward_kernel[(batch, channel_blocks)](
        x, dt, A, B, C, D, checkpoints, grad_y, grad_h_last, scratch,
        grad_x, grad_dt, grad_A_parts, grad_B_parts, grad_C_parts, grad_D_parts, grad_h0,
        length, d_inner, d_state, checkpoints.shape[1], batch,
        BLOCK_D=block_d, BLOCK_N=block_n, CHUNK=CHECKPOINT_EVERY,
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
