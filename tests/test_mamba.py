import pytest
import torch

from bakallm.mamba import Mamba
from bakallm.scan import linear_scan, selective_scan, selective_scan_reference


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


@pytest.mark.parametrize("block", [1, 7, 16, 64])
def test_fast_scan_equals_sequential_reference_outputs_and_gradients(block):
    inputs = scan_inputs()
    y_ref, h_ref = selective_scan_reference(*inputs)
    grad_y, grad_h = torch.randn_like(y_ref), torch.randn_like(h_ref)
    ref_grads = torch.autograd.grad((y_ref * grad_y).sum() + (h_ref * grad_h).sum(), inputs)
    # The fast scan computes in float32; compare against the float64 reference.
    y, h = selective_scan(*inputs, block=block)
    grads = torch.autograd.grad((y * grad_y.float()).sum() + (h * grad_h.float()).sum(), inputs)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_matches_a_loop(reverse):
    decay, inputs, initial = torch.rand(3, 30, 5), torch.randn(3, 30, 5), torch.randn(3, 5)
    expected, h = torch.empty_like(inputs), initial
    for t in (range(29, -1, -1) if reverse else range(30)):
        h = decay[:, t] * h + inputs[:, t]
        expected[:, t] = h
    torch.testing.assert_close(linear_scan(decay, inputs, initial, reverse=reverse), expected)


@pytest.mark.parametrize("scan", ["fast", "reference"])
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
    for scan in ("fast", "reference"):
        mamba.scan = scan
        mamba.zero_grad()
        y, _, h = mamba(x, conv, ssm)
        (y.square().sum() + h.sum()).backward()
        results[scan] = (y.detach(), x.grad.clone(), mamba.A_log.grad.clone(), mamba.in_proj.weight.grad.clone())
        x.grad = None
    for got, want in zip(results["fast"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
