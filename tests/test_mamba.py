import math

import pytest
import torch
import torch.nn.functional as F

from bakallm.kernels.blocked import selective_scan
from bakallm.kernels.reference import selective_scan_reference
from bakallm.model.mamba import Mamba


def scan_inputs(batch=2, length=45, d_inner=12, d_state=4):
    torch.manual_seed(1)
    return [
        torch.randn(batch, length, d_inner, dtype=torch.float64, requires_grad=True),
        (torch.rand(batch, length, d_inner, dtype=torch.float64) * 0.5).requires_grad_(),
        (-torch.rand(d_inner, d_state, dtype=torch.float64) * 4).requires_grad_(),
        torch.randn(batch, length, d_state, dtype=torch.float64, requires_grad=True),
        torch.randn(batch, length, d_state, dtype=torch.float64, requires_grad=True),
        torch.randn(d_inner, dtype=torch.float64, requires_grad=True),
        torch.randn(batch, d_inner, d_state, dtype=torch.float64, requires_grad=True),
    ]


def reference_and_fast(inputs, dtype, scan=selective_scan, **scan_options):
    """Outputs and gradients of the reference and a fast scan (the blocked one by default) for the
    same random output gradients."""
    y_ref, h_ref = selective_scan_reference(*inputs)
    grad_y, grad_h = torch.randn_like(y_ref), torch.randn_like(h_ref)
    ref_grads = torch.autograd.grad((y_ref * grad_y).sum() + (h_ref * grad_h).sum(), inputs)
    y, h = scan(*(t.to(dtype) for t in inputs), **scan_options)
    grads = torch.autograd.grad((y * grad_y.to(dtype)).sum() + (h * grad_h.to(dtype)).sum(), inputs)
    return (y_ref, h_ref, *ref_grads), (y, h, *grads)


# Blocks and sub-chunks that divide the length or not (padded sub-chunks, short last block).
@pytest.mark.parametrize("block, chunk", [(1, 1), (7, 3), (16, 4), (16, 16), (45, 8), (64, 5)])
def test_fast_scan_equals_sequential_reference_outputs_and_gradients(block, chunk):
    want, got = reference_and_fast(scan_inputs(), torch.float64, block=block, chunk=chunk)
    for name, g, w in zip(("y", "h", "x", "dt", "A", "B", "C", "D", "h0"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda message, name=name: f"{name}: {message}")


def test_fast_scan_in_float32_stays_close_to_the_float64_reference():
    want, got = reference_and_fast(scan_inputs(length=130), torch.float32)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_fast_scan_keeps_no_state_tensor_for_the_whole_sequence():
    x, dt, A, B, C, D, h0 = scan_inputs(batch=1, length=256, d_inner=8, d_state=4)
    whole_sequence_states = x.numel() * A.shape[1]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        y, h = selective_scan(x, dt, A, B, C, D, h0, block=64)
    assert max(sizes) < whole_sequence_states
    (y.sum() + h.sum()).backward()


# d_inner 16 and 80: one channel block of the compiled kernel, partly filled, and two.
@pytest.mark.parametrize("d_model", [8, 40])
def test_causal_conv_is_silu_of_conv1d_with_the_carried_inputs_in_front(d_model, cpu_kernels):
    mamba = Mamba(d_model, d_state=4, d_conv=4, expand=2).double()
    hidden = torch.randn(2, 11, mamba.d_inner, dtype=torch.float64)
    conv_state = torch.randn(2, mamba.d_inner, 3, dtype=torch.float64)
    out, new_state = mamba._causal_conv(hidden, conv_state)
    conv_input = torch.cat((conv_state, hidden.transpose(1, 2)), dim=2)
    expected = F.conv1d(conv_input, mamba.conv.weight, mamba.conv.bias, groups=mamba.d_inner).transpose(1, 2)
    torch.testing.assert_close(out, F.silu(expected))
    torch.testing.assert_close(new_state, conv_input[:, :, -3:].float())
    assert cpu_kernels.calls == 1


# A window longer than the carried inputs and one shorter; one carried input in one row, where the
# state's slice of the padded inputs is contiguous already (the state must still be a copy).
# d_model 40: two channel blocks of the compiled kernel, the second partly filled.
@pytest.mark.parametrize(("length", "d_conv", "rows", "d_model"), [(11, 4, 2, 8), (2, 4, 2, 40), (5, 2, 1, 8)])
def test_causal_conv_gradients_equal_conv1d_s_through_output_and_state(length, d_conv, rows, d_model, cpu_kernels):
    mamba = Mamba(d_model, d_state=4, d_conv=d_conv, expand=2).double()
    generator = torch.Generator().manual_seed(length)
    hidden = torch.randn(rows, length, mamba.d_inner, dtype=torch.float64, generator=generator, requires_grad=True)
    conv_state = torch.randn(
        rows, mamba.d_inner, d_conv - 1, dtype=torch.float64, generator=generator, requires_grad=True
    )
    out, new_state = mamba._causal_conv(hidden, conv_state)
    grad_out, grad_state = (
        torch.randn(out.shape, dtype=torch.float64, generator=generator),
        torch.randn(new_state.shape, generator=generator),
    )
    inputs = (hidden, conv_state, mamba.conv.weight, mamba.conv.bias)
    got = torch.autograd.grad((out * grad_out).sum() + (new_state * grad_state).sum(), inputs)
    conv_input = torch.cat((conv_state, hidden.transpose(1, 2)), dim=2)
    expected_out = F.silu(
        F.conv1d(conv_input, mamba.conv.weight, mamba.conv.bias, groups=mamba.d_inner).transpose(1, 2)
    )
    expected_state = conv_input[:, :, 1 - d_conv :]
    want = torch.autograd.grad((expected_out * grad_out).sum() + (expected_state * grad_state).sum(), inputs)
    for name, g, w in zip(("hidden", "conv state", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")
    assert cpu_kernels.calls == 1  # backward takes the path forward took
    single = Mamba(d_model, d_state=4, d_conv=d_conv, expand=2)
    _, state = single._causal_conv(hidden.detach().float().requires_grad_(), conv_state.detach().float())
    assert state._base is None  # in float32 too a copy, not a view of the padded inputs


def test_one_position_steps_equal_the_full_forward():
    mamba = Mamba(16, d_state=4, d_conv=4, expand=2).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    conv = torch.randn(2, mamba.d_inner, 3, dtype=torch.float64)
    ssm = torch.randn(2, mamba.d_inner, 4, dtype=torch.float64)
    whole, conv_whole, ssm_whole = mamba(x, conv, ssm)
    steps = []
    for t in range(x.shape[1]):
        y, conv, ssm = mamba.step(x[:, t : t + 1], conv, ssm)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1).double(), whole.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssm.double(), ssm_whole.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.double(), conv_whole.double())


@pytest.mark.parametrize("scan", ["blocked", "reference"])
def test_mamba_block_carries_state_across_calls(scan):
    mamba = Mamba(16, d_state=4, d_conv=4, expand=2).double()
    mamba.scan = scan
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    conv, ssm = (s.double() for s in mamba.initial_state(2))
    whole, conv_whole, ssm_whole = mamba(x, conv, ssm)
    first, conv1, ssm1 = mamba(x[:, :9], conv, ssm)
    second, conv2, ssm2 = mamba(x[:, 9:], conv1, ssm1)
    torch.testing.assert_close(torch.cat((first, second), dim=1).double(), whole.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ssm2.double(), ssm_whole.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv2.double(), conv_whole.double())


def test_fast_and_reference_mamba_blocks_agree_with_gradients():
    mamba = Mamba(16, d_state=4)
    x = torch.randn(2, 40, 16, requires_grad=True)
    conv, ssm = mamba.initial_state(2)
    results = {}
    for scan in ("blocked", "reference"):
        mamba.scan = scan
        mamba.zero_grad()
        y, _, h = mamba(x, conv, ssm)
        (y.square().sum() + h.sum()).backward()
        results[scan] = (y.detach(), x.grad.clone(), mamba.A_log.grad.clone(), mamba.in_proj.weight.grad.clone())
        x.grad = None
    for got, want in zip(results["blocked"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def written_out_recurrence(x, dt, A, B, C, D, h0):
    """Mamba-1's recurrence one row, step, channel and state at a time:
    h[t] = exp(dt[t] A) h[t-1] + dt[t] B[t] x[t];  y[t] = sum_n C[t, n] h[t, n] + D x[t]."""
    rows, length, channels = x.shape
    y = torch.zeros_like(x)
    h = h0.clone()
    for b in range(rows):
        for t in range(length):
            for d in range(channels):
                for n in range(A.shape[1]):
                    h[b, d, n] = math.exp(dt[b, t, d] * A[d, n]) * h[b, d, n] + dt[b, t, d] * B[b, t, n] * x[b, t, d]
                y[b, t, d] = sum(C[b, t, n] * h[b, d, n] for n in range(A.shape[1])) + D[d] * x[b, t, d]
    return y, h


@pytest.mark.parametrize("scan", [selective_scan, selective_scan_reference])
def test_scans_follow_the_mamba_recurrence_written_out(scan):
    inputs = [t.detach() for t in scan_inputs(batch=2, length=9, d_inner=3, d_state=2)]
    y, h = scan(*inputs)
    expected_y, expected_h = written_out_recurrence(*inputs)
    torch.testing.assert_close(y, expected_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, expected_h, rtol=1e-10, atol=1e-10)


def test_the_cpu_scan_times_one_thread_and_all_threads_then_restores_the_thread_count(monkeypatch):
    from bakallm.kernels import blocked as scan

    threads_seen = []
    real_addcmul = torch.addcmul

    def recording_addcmul(*args, **kwargs):
        threads_seen.append(torch.get_num_threads())
        return real_addcmul(*args, **kwargs)

    choice = scan.CpuThreadChoice()
    monkeypatch.setattr(scan, "cpu_thread_choice", choice)
    monkeypatch.setattr(torch, "addcmul", recording_addcmul)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(2):
            x = torch.randn(1, 40, 8, requires_grad=True)
            y, _ = scan.selective_scan(
                x,
                torch.rand(1, 40, 8) * 0.1,
                -torch.rand(8, 4),
                torch.randn(1, 40, 4),
                torch.randn(1, 40, 4),
                torch.ones(8),
                torch.zeros(1, 8, 4),
            )
            y.sum().backward()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert set(threads_seen) == {1, 2}  # the first call of each direction on one thread, the second on both
    assert set(choice.seconds_per_element) == {("forward", 1), ("forward", 2), ("backward", 1), ("backward", 2)}


def test_the_thread_choice_runs_the_faster_and_follows_a_change_of_load():
    from bakallm.kernels.blocked import CpuThreadChoice

    now = [0.0]
    choice = CpuThreadChoice(probe_spacing=8, clock=lambda: now[0])
    cost = {1: 1.0, 4: 3.0}  # seconds per call: one thread is 3x faster, as on a busy machine

    def run(calls: int) -> list[int]:
        chosen = []
        for _ in range(calls):
            threads = choice.threads_for("forward", 4)
            now[0] += cost[threads]
            choice.record("forward", threads, cost[threads], elements=1)
            chosen.append(threads)
        return chosen

    busy = run(100)
    assert busy[:2] == [1, 4]  # each measured once
    assert busy.count(4) in (4, 5)  # then a probe every 8 x 3 = 24 calls of the faster
    cost.update({1: 2.0, 4: 1.0})  # the neighbour left: both threads now twice as fast
    idle = run(100)
    assert idle[-50:].count(1) <= 50 // 8  # the change is seen at the next probe; one thread is now only probed
    assert choice.seconds_per_element[("forward", 4)] < choice.seconds_per_element[("forward", 1)]


@pytest.mark.parametrize("dt_min", [1e-3, 1e-5])
def test_model_config_mamba_dt_min_sets_the_slowest_initial_step_sizes(dt_min):
    from bakallm import BakaLM, ModelConfig

    torch.manual_seed(0)
    model = BakaLM(ModelConfig.preset("tiny", vocab_size=64, n_layers=2, mamba_dt_min=dt_min))
    for layer in model.layers:
        step_sizes = F.softplus(layer.mamba.dt_proj.bias.detach())
        assert step_sizes.min() >= dt_min * 0.999 and step_sizes.max() <= 0.1 * 1.001
        assert step_sizes.min() < 2 * dt_min  # 256 log-uniform draws reach the bottom of the range
    with pytest.raises(ValueError, match="mamba_dt_min must lie between 0 and 0.1"):
        ModelConfig.preset("tiny", mamba_dt_min=0.5)
