"""Mamba-1 selective scan: a sequential reference and a blocked scan with a hand-written backward.

Both compute, for every row b, channel d and state n,

    h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * x[t]
    y[t] = sum_n C[t, n] * h[t, :, n] + D * x[t]

and return (y, h[T-1]) so the state can be carried into the next call.

The fast scan walks the sequence in blocks of `block` steps, so no [B, T, d_inner, d_state]
tensor for the whole sequence is ever built; it keeps only the state at each block start for
backward and recomputes the block there. Inside a block, the linear recurrence is split into
sub-chunks: a scan along the sub-chunk positions runs for all sub-chunks at once, then the states
entering each sub-chunk are propagated and added back. The Python loops therefore run about
2*sqrt(block) times per block, never once per token.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BLOCK = 64


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


def _sub_chunk_size(length: int) -> int:
    """The divisor of `length` closest to its square root, which balances the two loops."""
    root = math.isqrt(length)
    for offset in range(root + 1):
        for candidate in (root - offset, root + offset):
            if 1 <= candidate <= length and length % candidate == 0:
                return candidate
    return 1


def linear_scan(decay: torch.Tensor, inputs: torch.Tensor, initial: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """All states of h[t] = decay[t] * h[t-1] + inputs[t] along dim 1, with h[-1] = initial.

    With reverse=True time runs backwards: h[t] = decay[t] * h[t+1] + inputs[t], h[K] = initial.
    decay, inputs: [Bt, K, ...]; initial: [Bt, ...].
    """
    rows, length = inputs.shape[:2]
    tail = inputs.shape[2:]
    chunk = _sub_chunk_size(length)
    n_chunks = length // chunk
    decay = decay.reshape(rows, n_chunks, chunk, *tail)
    inputs = inputs.reshape(rows, n_chunks, chunk, *tail)
    states = torch.empty_like(inputs)
    cumulative_decay = torch.empty_like(decay)
    order = range(chunk - 1, -1, -1) if reverse else range(chunk)
    previous = order[0]
    states[:, :, previous] = inputs[:, :, previous]
    cumulative_decay[:, :, previous] = decay[:, :, previous]
    for position in order[1:]:
        torch.addcmul(inputs[:, :, position], decay[:, :, position], states[:, :, previous], out=states[:, :, position])
        torch.mul(decay[:, :, position], cumulative_decay[:, :, previous], out=cumulative_decay[:, :, position])
        previous = position
    last = previous
    entering = torch.empty(rows, n_chunks, *tail, dtype=inputs.dtype, device=inputs.device)
    carry = initial
    for index in range(n_chunks - 1, -1, -1) if reverse else range(n_chunks):
        entering[:, index] = carry
        carry = torch.addcmul(states[:, index, last], cumulative_decay[:, index, last], carry)
    states.addcmul_(cumulative_decay, entering.unsqueeze(2))
    return states.reshape(rows, length, *tail)


def _block_terms(x, dt, A, B):
    """Per-step decay exp(dt*A) and input dt*x*B for one block, both [Bt, K, Di, N]."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    inputs = (dt * x).unsqueeze(-1) * B.unsqueeze(2)
    return decay, inputs


class _BlockedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, block: int):
        length = x.shape[1]
        y = torch.empty_like(x)
        block_starts = []
        h = h0
        for start in range(0, length, block):
            end = min(start + block, length)
            block_starts.append(h)
            decay, inputs = _block_terms(x[:, start:end], dt[:, start:end], A, B[:, start:end])
            states = linear_scan(decay, inputs, h)
            y[:, start:end] = torch.einsum("bkdn,bkn->bkd", states, C[:, start:end])
            h = states[:, -1].clone()
        y.addcmul_(x, D)
        ctx.block = block
        ctx.save_for_backward(x, dt, A, B, C, D, torch.stack(block_starts))
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, D, block_starts = ctx.saved_tensors
        block, length = ctx.block, x.shape[1]
        grad_y = grad_y.contiguous()
        grad_x = grad_y * D
        grad_dt = torch.empty_like(dt)
        grad_B = torch.empty_like(B)
        grad_C = torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        grad_D = (grad_y * x).sum(dim=(0, 1))
        carry = grad_h_last if grad_h_last is not None else torch.zeros_like(block_starts[0])
        starts = list(range(0, length, block))
        for index in range(len(starts) - 1, -1, -1):
            start = starts[index]
            end = min(start + block, length)
            xb, dtb, Bb, Cb, gyb = x[:, start:end], dt[:, start:end], B[:, start:end], C[:, start:end], grad_y[:, start:end]
            h_start = block_starts[index]
            decay, inputs = _block_terms(xb, dtb, A, Bb)
            states = linear_scan(decay, inputs, h_start)
            previous_states = torch.cat((h_start.unsqueeze(1), states[:, :-1]), dim=1)
            # dL/dh[t] = C[t] * dy[t] + exp(dt[t+1] A) * dL/dh[t+1]: the same recurrence, backwards.
            next_decay = torch.cat((decay[:, 1:], torch.ones_like(decay[:, :1])), dim=1)
            output_grad = gyb.unsqueeze(-1) * Cb.unsqueeze(2)
            state_grad = linear_scan(next_decay, output_grad, carry, reverse=True)
            carry = decay[:, 0] * state_grad[:, 0]
            grad_C[:, start:end] = torch.einsum("bkdn,bkd->bkn", states, gyb)
            grad_B[:, start:end] = torch.einsum("bkdn,bkd->bkn", state_grad, dtb * xb)
            grad_dt_x = torch.einsum("bkdn,bkn->bkd", state_grad, Bb)
            decay_grad = state_grad * previous_states * decay  # dL/d(dt*A)
            grad_dt[:, start:end] = grad_dt_x * xb + torch.einsum("bkdn,dn->bkd", decay_grad, A)
            grad_x[:, start:end] += grad_dt_x * dtb
            grad_A += torch.einsum("bkdn,bkd->dn", decay_grad, dtb)
        return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, carry, None


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
    block: int = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast scan with the reference's signature; computes in float32."""
    tensors = [t.float().contiguous() for t in (x, dt, A, B, C, D, h0)]
    return _BlockedSelectiveScan.apply(*tensors, block)
