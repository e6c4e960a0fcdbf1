"""Mamba-1 selective scan in log depth: a handful of large operations per block, for GPUs without a
working Triton (the reference is in reference.py).

The recurrence h[t] = a[t] * h[t-1] + u[t], with a[t] = exp(dt[t] * A) and u[t] = dt[t] * B[t] *
x[t], is associative: a block of L steps is scanned in log2(L) rounds, each combining every step
with the one 2^k before it (Hillis-Steele). Every round is two element-wise operations on the whole
block [rows, L, d_inner, d_state], so a block costs about 4 log2(L) operations instead of the
blocked scan's loops over positions: on a GPU, where each operation is a kernel launch, a window
of 512 tokens takes a few hundred launches instead of thousands. The products of decays only
shrink (a <= 1), so no round overflows. The work is L log2(L) instead of L per step, which a GPU
absorbs and a CPU does not: the blocked scan stays the CPU's.

Backward recomputes each block's states from its saved entering state and runs the adjoint
recurrence g[t] = C[t] dy[t] + a[t+1] g[t+1] the same way, backwards in time, so memory is a few
block-sized tensors whatever the sequence length.
"""

from __future__ import annotations

import torch

from bakallm.kernels.reference import scan_operands

# Positions per block: a whole window of the reference layout (552 positions) in one block, so a
# window costs one scan of about 10 rounds; memory is a few [rows, block, d_inner, d_state] tensors.
DEFAULT_BLOCK = 1024


def _scan(decay: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """States h[t] = decay[t] * h[t-1] + inputs[t] along dim 1 from h[-1] = 0, in log2(L) rounds.
    Overwrites `decay` (with running products) and returns `inputs` overwritten by the states."""
    length, offset = inputs.shape[1], 1
    while offset < length:
        # Each product is computed out of place before it is added, so the overlapping reads and
        # writes need no clone (the same values as addcmul_ of a clone, in fewer operator calls).
        later_decay = decay[:, offset:]
        inputs[:, offset:].add_(inputs[:, :-offset] * later_decay)
        if 2 * offset < length:  # the last round's products are never read
            later_decay.copy_(later_decay * decay[:, :-offset])
        offset *= 2
    return inputs


def _contract(states: torch.Tensor, other: torch.Tensor, other_dims: str) -> torch.Tensor:
    """Products of states [b, l, d, n] with `other` ([b, l, n] or [b, l, d]) summed over the axis
    `other` lacks: y = sum_n states C, or sum_d states dy. An element-wise product and a sum: about 5
    operator calls where einsum makes 22."""
    if other_dims == "bln":
        return (states * other.unsqueeze(2)).sum(3)
    return (states * other.unsqueeze(3)).sum(2)


class _ParallelSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, block: int):
        length = x.shape[1]
        y = torch.empty_like(x)
        starts = []
        state = h0
        for start in range(0, length, block):
            end = min(start + block, length)
            starts.append(state)
            states = _block_states(x[:, start:end], dt[:, start:end], A, B[:, start:end], state)
            y[:, start:end] = _contract(states, C[:, start:end], "bln")
            state = states[:, -1]
        y.addcmul_(x, D)
        ctx.block = block
        ctx.save_for_backward(x, dt, A, B, C, D, torch.stack(starts))
        return y, state

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, D, starts = ctx.saved_tensors
        block, length = ctx.block, x.shape[1]
        grad_y = grad_y.contiguous()
        grad_x, grad_dt, grad_B, grad_C = (
            torch.empty_like(x),
            torch.empty_like(dt),
            torch.empty_like(B),
            torch.empty_like(C),
        )
        grad_A = torch.zeros_like(A)
        carry = grad_h_last  # a[t+1] g[t+1] reaching the last step of the block being processed
        for index, start in reversed(list(enumerate(range(0, length, block)))):
            end = min(start + block, length)
            x_part, dt_part, B_part, C_part, dy = (
                x[:, start:end],
                dt[:, start:end],
                B[:, start:end],
                C[:, start:end],
                grad_y[:, start:end],
            )
            entering = starts[index]
            states = _block_states(x_part, dt_part, A, B_part, entering)
            decay = torch.exp(dt_part.unsqueeze(-1) * A)
            # Adjoint: g[t] = C[t] dy[t] + a[t+1] g[t+1], scanned backwards (flipped in time).
            sources = dy.unsqueeze(-1) * C_part.unsqueeze(2)
            sources[:, -1] += carry
            shifted = torch.cat([decay[:, 1:], torch.zeros_like(decay[:, :1])], dim=1)
            grads = _scan(shifted.flip(1), sources.flip(1)).flip(1)
            previous = torch.cat([entering.unsqueeze(1), states[:, :-1]], dim=1)
            grad_C[:, start:end] = _contract(states, dy, "bld")
            grad_u = grads  # dL/du[t] = g[t]
            grad_B[:, start:end] = _contract(grad_u, dt_part * x_part, "bld")
            grad_dt_x = _contract(grad_u, B_part, "bln")
            grad_decay_log = grads * previous * decay  # dL/d(dt[t] A), through a[t] = exp(dt[t] A)
            grad_A += (grad_decay_log * dt_part.unsqueeze(3)).sum((0, 1))
            grad_dt[:, start:end] = (grad_decay_log * A).sum(3) + grad_dt_x * x_part
            grad_x[:, start:end] = grad_dt_x * dt_part
            carry = decay[:, 0] * grads[:, 0]
        grad_x.addcmul_(grad_y, D)
        grad_D = (grad_y * x).sum(dim=(0, 1))
        return grad_x, grad_dt, grad_A, grad_B, grad_C, grad_D, carry, None


def _block_states(x, dt, A, B, entering):
    """The states [rows, L, d_inner, d_state] after each step of a block, from `entering`."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    inputs = (dt * x).unsqueeze(-1) * B.unsqueeze(2)
    inputs[:, 0].addcmul_(decay[:, 0], entering)
    return _scan(decay, inputs)


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
    """Log-depth scan with the reference's signature; computes in float32, or float64 for float64 inputs."""
    tensors = scan_operands(x, dt, A, B, C, D, h0)
    return _ParallelSelectiveScan.apply(*tensors, block)
