"""The log-depth (parallel) selective scan equals the token-by-token reference, outputs and every
gradient, and runs a window in a few hundred operations."""

import pytest
import torch

from bakallm.kernels.parallel import selective_scan
from bakallm.model.mamba import Mamba
from test_mamba import reference_and_fast, scan_inputs


# Blocks that divide the length or not, a block of one step, one block for the whole sequence.
@pytest.mark.parametrize("block", [1, 7, 16, 45, 64, 1024])
def test_parallel_scan_equals_sequential_reference_outputs_and_gradients(block):
    want, got = reference_and_fast(scan_inputs(), torch.float64, scan=selective_scan, block=block)
    for name, g, w in zip(("y", "h", "x", "dt", "A", "B", "C", "D", "h0"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda message, name=name: f"{name}: {message}")


def test_parallel_scan_in_float32_with_large_steps_stays_finite_and_close():
    inputs = scan_inputs(length=300)
    with torch.no_grad():
        inputs[1].mul_(20)  # dt up to 10: decays of exp(-40) per step, that underflow to zero
    want, got = reference_and_fast(inputs, torch.float32, scan=selective_scan)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_mamba_block_with_the_parallel_scan_carries_state_across_calls():
    torch.manual_seed(0)
    mamba = Mamba(16, d_state=4, d_conv=4, expand=2).double()
    mamba.scan = "parallel"
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    conv, ssm = (s.double() for s in mamba.initial_state(2))
    whole, _, ssm_whole = mamba(x, conv, ssm)
    first, conv1, ssm1 = mamba(x[:, :9], conv, ssm)
    second, _, ssm2 = mamba(x[:, 9:], conv1, ssm1)
    torch.testing.assert_close(torch.cat((first, second), dim=1), whole)
    torch.testing.assert_close(ssm2, ssm_whole)


def test_a_window_takes_few_operations():
    """The reason this backend exists: on a GPU every operation is a kernel launch."""
    from torch.profiler import ProfilerActivity, profile

    x, dt, A, B, C, D, h0 = (
        t.detach().float().requires_grad_() for t in scan_inputs(batch=2, length=552, d_inner=32, d_state=8)
    )
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        y, h = selective_scan(x, dt, A, B, C, D, h0)
        (y.sum() + h.sum()).backward()
    calls = sum(event.count for event in trace.key_averages() if event.key.startswith("aten::"))
    assert calls < 1000, calls
