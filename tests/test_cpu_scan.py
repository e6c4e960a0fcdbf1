"""The compiled CPU scan (kernels/cpu_scan.cpp) against the reference scan: outputs, carried state
and every gradient, at shapes that leave partial channel blocks and checkpoint segments."""

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.kernels.cpu_build import compiled_module, openmp_failure
from bakallm.kernels.cpu_scan import selective_scan
from bakallm.kernels.reference import selective_scan_reference
from bakallm.model.mamba import Mamba

built = compiled_module()
pytestmark = pytest.mark.skipif(isinstance(built, str), reason=f"the C++ scan does not build here: {built}")

NAMES = ("y", "h", "dx", "ddt", "dA", "dB", "dC", "dD", "dh0")


def scan_inputs(rows, length, channels, states, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    values = [
        torch.randn(rows, length, channels, generator=generator),
        torch.rand(rows, length, channels, generator=generator) * 0.3,
        -torch.rand(channels, states, generator=generator) * 2,
        torch.randn(rows, length, states, generator=generator),
        torch.randn(rows, length, states, generator=generator),
        torch.randn(channels, generator=generator),
        torch.randn(rows, channels, states, generator=generator),
    ]
    return [value.to(dtype) for value in values]


def outputs_and_gradients(scan, values):
    inputs = [value.clone().requires_grad_() for value in values]
    y, h = scan(*inputs)
    generator = torch.Generator().manual_seed(1)
    weight_y = torch.randn(y.shape, generator=generator).to(y.dtype)
    weight_h = torch.randn(h.shape, generator=generator).to(h.dtype)
    return [y, h, *torch.autograd.grad((y * weight_y).sum() + (h * weight_h).sum(), inputs)]


@pytest.mark.parametrize(
    "rows, length, channels, states",
    [(1, 1, 1, 1), (2, 37, 40, 16), (3, 16, 32, 4), (1, 552, 70, 16), (2, 17, 33, 8)],
)
def test_equals_the_reference_in_float64(rows, length, channels, states):
    values = scan_inputs(rows, length, channels, states, torch.float64)
    got = outputs_and_gradients(selective_scan, values)
    want = outputs_and_gradients(selective_scan_reference, values)
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), f"{name}: max difference {(a - b).abs().max():.2e}"


def test_float32_stays_close_to_the_float64_reference():
    values = scan_inputs(2, 552, 48, 16, torch.float32)
    got = outputs_and_gradients(selective_scan, values)
    want = outputs_and_gradients(selective_scan_reference, [value.double() for value in values])
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32
        relative = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert relative < 1e-5, f"{name}: relative difference {relative:.1e}"


def test_without_gradients_it_gives_the_same_outputs_and_keeps_nothing():
    values = scan_inputs(2, 40, 36, 16, torch.float32)
    with torch.no_grad():
        y, h = selective_scan(*values)
    want_y, want_h = outputs_and_gradients(selective_scan, values)[:2]
    assert torch.equal(y, want_y) and torch.equal(h, want_h)
    assert compiled_module().scan_forward(*values, False)[2].numel() == 0  # no checkpoints kept


def test_the_tasks_run_on_all_of_pytorchs_threads():
    if openmp_failure() is not None:
        pytest.skip(f"the kernel was built without OpenMP here: {openmp_failure()}")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert compiled_module().threads_used(64) == 2
        torch.set_num_threads(1)
        assert compiled_module().threads_used(64) == 1
    finally:
        torch.set_num_threads(threads)


def test_results_do_not_depend_on_the_thread_count():
    values = scan_inputs(3, 100, 96, 16, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = outputs_and_gradients(selective_scan, values)
        torch.set_num_threads(2)
        two = outputs_and_gradients(selective_scan, values)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, one, two):
        assert torch.equal(a, b), name


def test_a_mamba_block_trains_alike_with_the_cpu_and_the_blocked_scan():
    torch.manual_seed(0)
    block = Mamba(24)
    x = torch.randn(2, 45, 24)
    conv, ssm = block.initial_state(2)
    ssm = torch.randn_like(ssm)
    results = {}
    for backend in ("cpu", "blocked"):
        block.scan = backend
        block.zero_grad()
        y, _, state = block(x, conv, ssm)
        (y.square().sum() + state.sum()).backward()
        results[backend] = [y, state, *(parameter.grad for parameter in block.parameters())]
    for got, want in zip(results["cpu"], results["blocked"]):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_auto_runs_it_in_a_model_on_the_cpu():
    from bakallm.kernels import scan

    assert scan.resolve_scan_backend("auto", torch.device("cpu")) == "cpu"
    config = ModelConfig.preset("tiny", vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=32, window=16)
    model = BakaLM(config)
    ids = torch.randint(0, 64, (2, 40))
    got = model(ids, targets=ids).loss
    for layer in model.layers:
        layer.mamba.scan = "reference"
    assert torch.allclose(got, model(ids, targets=ids).loss, rtol=1e-5)


def test_non_finite_inputs_stay_non_finite_despite_fast_math():
    # Built with -ffast-math; the trainer finds a diverged step by its non-finite gradient norm.
    values = scan_inputs(1, 20, 40, 16, torch.float32)
    values[0][0, 3, 5] = float("nan")
    y, h, *gradients = outputs_and_gradients(selective_scan, values)
    assert y.isnan().any() and h.isnan().any() and gradients[1].isnan().any() and gradients[2].isnan().any()
    values = scan_inputs(1, 20, 40, 16, torch.float32)
    values[1][0, 2, 1] = float("inf")
    assert not selective_scan(*values)[0].isfinite().all()
