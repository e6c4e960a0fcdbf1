"""The compiled CPU passes (kernels/cpu_fused.py) give the same bits whatever PyTorch's thread count.

Their values against the PyTorch references are tested beside each module (test_elephant.py,
test_mamba.py, test_window.py, test_attention.py), through the `cpu_kernels` fixture."""

import pytest
import torch

from bakallm.kernels.cpu_build import compiled_module, openmp_failure
from bakallm.model.elephant import elephant_gate
from bakallm.model.mamba import Mamba
from bakallm.model.network import RMSNorm
from bakallm.model.rotary import apply_rotary

built = compiled_module()
pytestmark = pytest.mark.skipif(isinstance(built, str), reason=f"the CPU kernels do not build here: {built}")


def outputs_and_gradients(function, inputs):
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(output.shape, generator=generator) for output in outputs]
    total = sum((output * weight).sum() for output, weight in zip(outputs, weights))
    return [*outputs, *torch.autograd.grad(total, inputs)]


def cases():
    """Shapes whose work splits into several tasks: 40,000 gate elements (3 parts of 16,384), 200
    norm rows (4 parts of 64), 150 conv channels (3 blocks of 64), 600 rotation rows (3 of 256)."""
    torch.manual_seed(0)  # the modules' own parameters
    generator = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).requires_grad_()

    mamba, norm = Mamba(75, d_state=4), RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
    state = torch.randn(2, mamba.d_inner, mamba.d_conv - 1, generator=generator)
    tables = torch.randn(50, 16, generator=generator), torch.randn(50, 16, generator=generator)
    return {
        "elephant gate": (elephant_gate, [leaf(40, 1000), leaf(40, 1000)]),
        "rms norm": (lambda x, w: norm(x), [leaf(200, 48), norm.weight]),
        "conv + silu": (
            lambda h, w, b: mamba._causal_conv(h, state),
            [leaf(2, 30, mamba.d_inner), *mamba.conv.parameters()],
        ),
        "rotation": (lambda x: apply_rotary(x, *tables), [leaf(3, 4, 50, 16)]),
    }


@pytest.mark.skipif(openmp_failure() is not None, reason="the kernels were built without OpenMP: one thread only")
@pytest.mark.parametrize("name", list(cases()))
def test_results_do_not_depend_on_the_thread_count(name):
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            function, inputs = cases()[name]
            results.append(outputs_and_gradients(function, inputs))
    finally:
        torch.set_num_threads(threads)
    for index, (one, two) in enumerate(zip(*results)):
        assert torch.equal(one, two), f"{name}, result {index}: max difference {(one - two).abs().max():.1e}"


def test_a_wrong_shape_is_refused_rather_than_read_out_of_bounds():
    x = torch.randn(1, 2, 10, 8)
    with pytest.raises(RuntimeError, match="tables must be"):
        built.rotate(x, torch.randn(9, 8), torch.randn(9, 8), False)
    with pytest.raises(RuntimeError, match="not as wide"):
        built.rms_norm_forward(torch.randn(3, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="expected padded"):
        built.conv_silu_forward(torch.randn(1, 5, 6), torch.randn(5, 4), torch.randn(6))
    with pytest.raises(RuntimeError, match="differ in shape"):
        built.elephant_gate_forward(torch.randn(4, 6), torch.randn(4, 5), 1.0, 8.0)
