import pytest
import torch

from bakallm.model.elephant import elephant, elephant_gate
from bakallm.model.mlp import GatedMLP


def test_elephant_values_follow_the_formula():
    x = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0])
    expected = torch.tensor([1.0, 1 / (1 + 0.5**8), 0.5, 0.5, 1 / (1 + 2.0**8)])
    torch.testing.assert_close(elephant(x), expected)
    torch.testing.assert_close(elephant(torch.tensor([3.0]), a=2.0, d=2.0), torch.tensor([1 / (1 + 1.5**2)]))


# d = 2, 4, 8, 16 take the repeated-squaring path; 3.5 and 3 the general one.
# Both through the compiled CPU kernel and through PyTorch operations.
@pytest.mark.parametrize("a, d", [(1.0, 8.0), (2.0, 3.5), (0.5, 4.0), (1.0, 2.0), (0.7, 16.0), (1.3, 3.0)])
def test_fused_gate_matches_plain_formula_in_values_and_gradients(a, d, cpu_kernels):
    up = torch.randn(4, 33, 64, dtype=torch.float64, requires_grad=True)
    gate = (torch.randn(4, 33, 64, dtype=torch.float64) * 1.5).requires_grad_()
    grad = torch.randn(4, 33, 64, dtype=torch.float64)
    plain = elephant_gate(up, gate, a, d, fused=False)
    plain_grads = torch.autograd.grad(plain, (up, gate), grad)
    fused = elephant_gate(up, gate, a, d, fused=True)
    fused_grads = torch.autograd.grad(fused, (up, gate), grad)
    torch.testing.assert_close(fused, plain)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want)
    assert cpu_kernels.calls == 2  # forward and backward


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gate_without_gradients_matches_plain_formula(dtype, cpu_kernels):
    up, gate = torch.randn(4, 33, 64, dtype=dtype), torch.randn(4, 33, 64, dtype=dtype) * 1.5
    with torch.no_grad():
        torch.testing.assert_close(elephant_gate(up, gate), elephant_gate(up, gate, fused=False))
    assert cpu_kernels.calls == 1  # the fused call; the plain formula does not ask


def test_fused_gate_in_bfloat16_returns_bfloat16_close_to_float32():
    up = torch.randn(16, 64, requires_grad=True)
    gate = (torch.randn(16, 64) * 1.5).requires_grad_()
    grad = torch.randn(16, 64)
    low = [t.detach().bfloat16().requires_grad_() for t in (up, gate)]
    out = elephant_gate(*low)
    grads = torch.autograd.grad(out, low, grad.bfloat16())
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    exact = [t.detach().bfloat16().float().requires_grad_() for t in (up, gate)]
    want = elephant_gate(*exact)
    want_grads = torch.autograd.grad(want, exact, grad.bfloat16().float())
    for got, expected in zip((out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_fused_gate_keeps_only_its_inputs_for_backward():
    up = torch.randn(8, 16, requires_grad=True)
    gate = torch.randn(8, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        elephant_gate(up, gate)
    assert len(saved) == 2
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        elephant_gate(up, gate, fused=False)
    assert len(saved) > 2


def test_gated_mlp_is_down_of_up_times_elephant_gate():
    mlp = GatedMLP(8, 32)
    h = torch.randn(2, 5, 8)
    expected = mlp.down(mlp.up(h) * elephant(mlp.gate(h)))
    torch.testing.assert_close(mlp(h), expected)
    assert all(layer.bias is None for layer in (mlp.up, mlp.gate, mlp.down))


def test_the_fused_gate_without_gradients_gives_the_same_bits():
    torch.manual_seed(0)
    up, gate = torch.randn(3, 40), torch.randn(3, 40) * 2
    with torch.no_grad():
        plain_call = elephant_gate(up, gate, 1.5, 8.0)
    traced = elephant_gate(up.requires_grad_(), gate.requires_grad_(), 1.5, 8.0)
    assert traced.grad_fn is not None and torch.equal(plain_call, traced.detach())
