"""Mamba-1 selective scan, blocked, with a hand-written backward (the reference is in reference.py).

Like the reference it computes, for every row b, channel d and state n,

    h[t] = exp(dt[t] * A) * h[t-1] + dt[t] * B[t] * x[t]
    y[t] = sum_n C[t, n] * h[t, :, n] + D * x[t]

and returns (y, h[T-1]) so the state can be carried into the next call.

The fast scan walks the sequence in blocks of `block` steps, so no [B, T, d_inner, d_state]
tensor for the whole sequence is ever built; it keeps only the state at each block start for
backward and recomputes the block there. A block is cut into sub-chunks of `chunk` steps, and the
recurrence runs in three phases whose Python loops are over positions or sub-chunks, never over
tokens:

1. for each position in a sub-chunk, one step for all sub-chunks at once, from a zero state;
2. for each sub-chunk, its entering state from the previous one's (a chunk's decay is
   exp(sum(dt) * A));
3. for each position again, one step from the true entering states, each state used as soon as it
   exists (for the output in forward, for dC in backward).

Backward runs the same three phases backwards in time for the state gradients and turns each
position's state gradient into the other input gradients as soon as it exists.

Inside a block, tensors are laid out [position, row * sub-chunk, d_state, d_inner]: the slice
for one position is contiguous and a batch of [d_state, d_inner] matrices, so the reductions
over d_state or d_inner are batched matrix products and the elementwise work runs along d_inner.
A block whose length is not a multiple of `chunk` is padded with dt = 0 steps (decay 1, input 0),
which carry states and gradients through unchanged.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from bakallm.kernels.reference import scan_operands

DEFAULT_BLOCK = 64
DEFAULT_CHUNK = 16


class _Workspace:
    """Buffers shared by the blocks of one call, the first (largest) block sizing them: fresh
    multi-megabyte buffers for every block cost more in page faults than the arithmetic on them."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[name] = self.like.new_empty(numel)
        return buffer[:numel].view(shape)


class _Block:
    """One block of the sequence in the position-major layout, with its decays and inputs.

    Sequence tensors [Bt, K, F] become [chunk, Bt * n_chunks, F]; `decay` and `inputs` are
    [chunk, Bt * n_chunks, N, Di]; `chunk_decay` [Bt, n_chunks, N, Di] is each sub-chunk's
    whole decay and `entering` [Bt * n_chunks, N, Di] the state before each sub-chunk. Block-sized
    tensors live in the call's workspace, so the next block overwrites them.
    """

    def __init__(self, x, dt, B, A_t, h_start, chunk: int, workspace: _Workspace):
        rows, length, _ = x.shape
        self.rows, self.length, self.chunk = rows, length, chunk
        self.n_chunks = -(-length // chunk)
        self.workspace = workspace
        self.dt = self.to_positions(dt)
        self.dt_x = self.to_positions(dt * x)
        self.B = self.to_positions(B)
        shape = (chunk, rows * self.n_chunks) + A_t.shape
        self.decay = torch.mul(self.dt.unsqueeze(2), A_t, out=workspace.get("decay", shape)).exp_()
        self.inputs = torch.mul(self.dt_x.unsqueeze(2), self.B.unsqueeze(3), out=workspace.get("inputs", shape))
        dt_sums = self.dt.sum(0).view(rows, self.n_chunks, 1, -1)
        self.chunk_decay = torch.mul(dt_sums, A_t).exp_()
        self.entering, self.end_state = self._entering_states(h_start)

    def to_positions(self, sequence: torch.Tensor) -> torch.Tensor:
        """[Bt, K, F] -> [chunk, Bt * n_chunks, F], zero-padded to n_chunks * chunk steps."""
        padding = self.n_chunks * self.chunk - self.length
        if padding:
            sequence = F.pad(sequence, (0, 0, 0, padding))
        grouped = sequence.reshape(self.rows, self.n_chunks, self.chunk, -1).permute(2, 0, 1, 3)
        return grouped.reshape(self.chunk, self.rows * self.n_chunks, -1)

    def to_sequence(self, positions: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_positions`: [chunk, Bt * n_chunks, F] -> [Bt, K, F]."""
        grouped = positions.reshape(self.chunk, self.rows, self.n_chunks, -1).permute(1, 2, 0, 3)
        return grouped.reshape(self.rows, self.n_chunks * self.chunk, -1)[:, : self.length]

    def by_chunk(self, states: torch.Tensor) -> torch.Tensor:
        """[Bt * n_chunks, N, Di] -> [Bt, n_chunks, N, Di]."""
        return states.view(self.rows, self.n_chunks, *states.shape[1:])

    def _entering_states(self, h_start):
        """Phases 1 and 2: each sub-chunk's final state from zero, then the true entering states."""
        local = self.workspace.get("local", self.inputs.shape[1:]).copy_(self.inputs[0])
        for position in range(1, self.chunk):
            torch.addcmul(self.inputs[position], self.decay[position], local, out=local)
        local = self.by_chunk(local)
        entering = self.workspace.get("entering", local.shape)
        state = h_start
        for index in range(self.n_chunks):
            entering[:, index] = state
            state = torch.addcmul(local[:, index], self.chunk_decay[:, index], state)
        return entering.view_as(self.inputs[0]), state

    def states(self, out: torch.Tensor | None = None):
        """Phase 3: yields (position, state after it) for every position of the sub-chunks.

        Without `out` one buffer holds the current state, overwritten at each step, so that it is
        used while still in cache; with `out`, the state after position p stays in out[p].
        """
        previous = self.entering
        running = self.workspace.get("running", previous.shape) if out is None else None
        for position in range(self.chunk):
            state = running if out is None else out[position]
            torch.addcmul(self.inputs[position], self.decay[position], previous, out=state)
            yield position, state
            previous = state

    def incoming_state_gradients(self, C, grad_y, carry):
        """Phases 1 and 2 of the backward recurrence dL/dh[t] = C[t] dy[t] + exp(dt[t+1] A) dL/dh[t+1].

        `carry` is the term exp(dt[t+1] A) dL/dh[t+1] reaching the block's last step t from the
        next block. Returns that term for the last step of every sub-chunk, and the block's own
        carry towards the previous block.
        """
        last = self.chunk - 1
        local = torch.mul(
            C[last].unsqueeze(2),
            grad_y[last].unsqueeze(1),
            out=self.workspace.get("local_state_grad", self.inputs.shape[1:]),
        )
        for position in range(last - 1, -1, -1):
            local.mul_(self.decay[position + 1]).addcmul_(C[position].unsqueeze(2), grad_y[position].unsqueeze(1))
        local = self.by_chunk(local.mul_(self.decay[0]))
        incoming = self.workspace.get("incoming", local.shape)
        for index in range(self.n_chunks - 1, -1, -1):
            incoming[:, index] = carry
            carry = torch.addcmul(local[:, index], self.chunk_decay[:, index], carry)
        return incoming.view_as(self.inputs[0]), carry


class CpuThreadChoice:
    """Chooses, by timing the scan itself, whether it runs on one CPU thread or on all of them.

    The blocked scan issues thousands of small operations per call, and on several threads each one
    ends in a barrier that waits for every thread of the pool. On an idle machine both threads still
    win (a celp18 step 1.4x faster than on one); when another process holds a core, every barrier
    waits for a descheduled thread and the scan runs 7-18x slower than on one thread
    (docs/performance.md). Which holds changes with the machine's load, so each direction (forward,
    backward) keeps a running time per element for both choices, runs the faster one, and now and
    then runs the slower one again to see whether the load changed. Probes are spaced by the ratio
    of the two times, so they cost at most about 1/`probe_spacing` of the scan's time.
    """

    def __init__(self, probe_spacing: int = 32, clock=time.perf_counter):
        self.probe_spacing = probe_spacing
        self.clock = clock
        self.seconds_per_element: dict[tuple[str, int], float] = {}
        self.calls_since_probe: dict[str, int] = {}

    def threads_for(self, direction: str, all_threads: int) -> int:
        one, many = self.seconds_per_element.get((direction, 1)), self.seconds_per_element.get((direction, all_threads))
        if one is None or many is None:
            return 1 if one is None else all_threads  # measure each choice once first
        faster, slower = (1, all_threads) if one <= many else (all_threads, 1)
        calls = self.calls_since_probe.get(direction, 0) + 1
        if calls >= self.probe_spacing * max(one, many) / min(one, many):
            self.calls_since_probe[direction] = 0
            return slower
        self.calls_since_probe[direction] = calls
        return faster

    def record(self, direction: str, threads: int, seconds: float, elements: int) -> None:
        key, measured = (direction, threads), seconds / elements
        previous = self.seconds_per_element.get(key)
        self.seconds_per_element[key] = measured if previous is None else (previous + measured) / 2

    @contextlib.contextmanager
    def timed(self, direction: str, like: torch.Tensor):
        """Runs the block on the chosen thread count (restored after) and times it; CUDA tensors run untouched."""
        all_threads = torch.get_num_threads()
        if like.device.type != "cpu" or all_threads == 1:
            yield
            return
        threads = self.threads_for(direction, all_threads)
        torch.set_num_threads(threads)
        started = self.clock()
        try:
            yield
        finally:
            torch.set_num_threads(all_threads)
        self.record(direction, threads, self.clock() - started, like.numel())


cpu_thread_choice = CpuThreadChoice()


class _BlockedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, block: int, chunk: int):
        with cpu_thread_choice.timed("forward", x):
            return _BlockedSelectiveScan._forward(ctx, x, dt, A, B, C, D, h0, block, chunk)

    @staticmethod
    def _forward(ctx, x, dt, A, B, C, D, h0, block: int, chunk: int):
        A_t = A.t().contiguous()
        length = x.shape[1]
        y = torch.empty_like(x)
        block_starts = []
        state = h0.transpose(1, 2).contiguous()  # [Bt, N, Di], the layout of the blocks
        workspace = _Workspace(x)
        for start in range(0, length, block):
            end = min(start + block, length)
            block_starts.append(state)
            part = _Block(x[:, start:end], dt[:, start:end], B[:, start:end], A_t, state, chunk, workspace)
            C_rows = part.to_positions(C[:, start:end]).unsqueeze(2)
            y_rows = workspace.get("y", C_rows.shape[:3] + x.shape[2:])
            for position, state in part.states():
                torch.bmm(C_rows[position], state, out=y_rows[position])
            y[:, start:end] = part.to_sequence(y_rows.squeeze(2))
            state = part.end_state
        y.addcmul_(x, D)
        ctx.block, ctx.chunk = block, chunk
        ctx.save_for_backward(x, dt, A, B, C, D, torch.stack(block_starts))
        return y, state.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        with cpu_thread_choice.timed("backward", grad_y):
            return _BlockedSelectiveScan._backward(ctx, grad_y, grad_h_last)

    @staticmethod
    def _backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, D, block_starts = ctx.saved_tensors
        block, chunk, length = ctx.block, ctx.chunk, x.shape[1]
        A_t = A.t().contiguous()
        grad_y = grad_y.contiguous()
        grad_dt_x = torch.empty_like(x)
        grad_dt_via_decay = torch.empty_like(dt)
        grad_B = torch.empty_like(B)
        grad_C = torch.empty_like(C)
        grad_A_t = torch.zeros_like(A_t)
        carry = grad_h_last.transpose(1, 2).contiguous()
        workspace = _Workspace(x)
        for index, start in reversed(list(enumerate(range(0, length, block)))):
            end = min(start + block, length)
            part = _Block(
                x[:, start:end], dt[:, start:end], B[:, start:end], A_t, block_starts[index], chunk, workspace
            )
            C_rows = part.to_positions(C[:, start:end])
            grad_y_rows = part.to_positions(grad_y[:, start:end])
            states = workspace.get("states", part.decay.shape)
            grad_C_rows = workspace.get("grad_C", C_rows.shape)
            for position, state in part.states(out=states):
                torch.bmm(state, grad_y_rows[position].unsqueeze(2), out=grad_C_rows[position].unsqueeze(2))
            state_grad, carry = part.incoming_state_gradients(C_rows, grad_y_rows, carry)
            grad_B_rows = workspace.get("grad_B", C_rows.shape)
            grad_dt_x_rows = workspace.get("grad_dt_x", grad_y_rows.shape)
            grad_dt_rows = workspace.get("grad_dt", grad_y_rows.shape)
            grad_A_rows = workspace.get("grad_A", state_grad.shape).zero_()
            decay_grad = workspace.get("decay_grad", state_grad.shape)
            for position in range(chunk - 1, -1, -1):
                state_grad.addcmul_(C_rows[position].unsqueeze(2), grad_y_rows[position].unsqueeze(1))  # dL/dh[t]
                torch.bmm(state_grad, part.dt_x[position].unsqueeze(2), out=grad_B_rows[position].unsqueeze(2))
                torch.bmm(part.B[position].unsqueeze(1), state_grad, out=grad_dt_x_rows[position].unsqueeze(1))
                state_grad.mul_(part.decay[position])  # now the term reaching h[t-1]
                previous = states[position - 1] if position else part.entering
                torch.mul(state_grad, previous, out=decay_grad)  # dL/d(dt[t] A)
                grad_A_rows.addcmul_(decay_grad, part.dt[position].unsqueeze(1))
                torch.sum(decay_grad.mul_(A_t), dim=1, out=grad_dt_rows[position])
            grad_C[:, start:end] = part.to_sequence(grad_C_rows)
            grad_B[:, start:end] = part.to_sequence(grad_B_rows)
            grad_dt_x[:, start:end] = part.to_sequence(grad_dt_x_rows)
            grad_dt_via_decay[:, start:end] = part.to_sequence(grad_dt_rows)
            grad_A_t += grad_A_rows.sum(0)
        grad_x = torch.addcmul(grad_y * D, grad_dt_x, dt)
        grad_dt = torch.addcmul(grad_dt_via_decay, grad_dt_x, x)
        grad_D = (grad_y * x).sum(dim=(0, 1))
        return grad_x, grad_dt, grad_A_t.t(), grad_B, grad_C, grad_D, carry.transpose(1, 2), None, None


# Runs eagerly inside compiled models: traced, its Python loops would unroll into thousands of nodes.
@torch.compiler.disable
def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
    block: int = DEFAULT_BLOCK,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fast scan with the reference's signature; computes in float32, or float64 for float64 inputs."""
    tensors = scan_operands(x, dt, A, B, C, D, h0)
    return _BlockedSelectiveScan.apply(*tensors, block, min(chunk, block))
