"""The Triton selective scan against the sequential reference; on a CPU under Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py). The interpreter runs each kernel operation in Python:
sizes stay small.
"""

import dataclasses

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
triton_scan = pytest.importorskip("bakallm.kernels.triton_scan", reason="triton does not import (pip install triton)")
if DEVICE.type == "cpu" and not triton_scan.INTERPRETED:
    pytest.skip("no GPU and the Triton kernels were defined without TRITON_INTERPRET=1", allow_module_level=True)

from bakallm import BakaLM, ModelConfig  # noqa: E402
from bakallm.acceleration import use_scan_backend  # noqa: E402
from bakallm.kernels.reference import selective_scan_reference  # noqa: E402
from bakallm.model.mamba import Mamba  # noqa: E402

NAMES = ("y", "final state", "grad x", "grad dt", "grad A", "grad B", "grad C", "grad D", "grad h0")


def scan_inputs(batch, length, d_inner, d_state=4, dtype=torch.float64):
    generator = torch.Generator().manual_seed(length * 10 + batch)
    tensors = [
        torch.randn(batch, length, d_inner, generator=generator),
        torch.rand(batch, length, d_inner, generator=generator) * 0.5,
        -torch.rand(d_inner, d_state, generator=generator) * 4,
        torch.randn(batch, length, d_state, generator=generator),
        torch.randn(batch, length, d_state, generator=generator),
        torch.randn(d_inner, generator=generator),
        torch.randn(batch, d_inner, d_state, generator=generator),
    ]
    return [t.to(DEVICE, dtype).requires_grad_() for t in tensors]


def outputs_and_gradients(scan, inputs, grad_y, grad_h):
    """(y, final state, every input gradient); the loss reaches the inputs through both outputs."""
    y, h = scan(*inputs)
    gradients = torch.autograd.grad((y.double() * grad_y).sum() + (h.double() * grad_h).sum(), inputs)
    return [y, h, *gradients]


# d_inner 40 spans three channel blocks, the last one partly masked; T = 37 and 552 end inside a
# tile, and 552 spans 35 tiles, each starting from a kept state.
@pytest.mark.parametrize(
    "length, batch, d_inner", [(1, 1, 8), (1, 3, 8), (37, 1, 8), (37, 3, 40), (552, 1, 8), (552, 3, 40)]
)
def test_triton_scan_equals_the_reference_outputs_final_state_and_gradients(length, batch, d_inner):
    reference_inputs = scan_inputs(batch, length, d_inner)
    grad_y = torch.randn(batch, length, d_inner, dtype=torch.float64, device=DEVICE)
    grad_h = torch.randn(batch, d_inner, 4, dtype=torch.float64, device=DEVICE)
    want = outputs_and_gradients(selective_scan_reference, reference_inputs, grad_y, grad_h)
    inputs = [t.detach().float().requires_grad_() for t in reference_inputs]
    saved_sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_sizes.append(t.numel()) or t, lambda t: t):
        got = outputs_and_gradients(triton_scan.selective_scan_triton, inputs, grad_y, grad_h)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(
            g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda message, name=name: f"{name}: {message}"
        )
    if length > triton_scan.TILE:  # only the states at the start of each tile are kept
        assert max(saved_sizes) < batch * length * d_inner * 4


@pytest.mark.parametrize("tile, block_d", [(8, 8), (32, 32)])
def test_triton_scan_gives_the_same_results_at_other_tile_and_channel_block_sizes(monkeypatch, tile, block_d):
    # The sizes a GPU sweep (bench_mamba.py --triton-configs) may choose instead of the defaults.
    monkeypatch.setattr(triton_scan, "TILE", tile)
    monkeypatch.setattr(triton_scan, "MAX_BLOCK_D", block_d)
    reference_inputs = scan_inputs(2, 75, 40)
    grad_y = torch.randn(2, 75, 40, dtype=torch.float64, device=DEVICE)
    grad_h = torch.randn(2, 40, 4, dtype=torch.float64, device=DEVICE)
    want = outputs_and_gradients(selective_scan_reference, reference_inputs, grad_y, grad_h)
    got = outputs_and_gradients(
        triton_scan.selective_scan_triton,
        [t.detach().float().requires_grad_() for t in reference_inputs],
        grad_y,
        grad_h,
    )
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(
            g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda message, name=name: f"{name}: {message}"
        )


def test_triton_scan_takes_bfloat16_inputs_and_keeps_a_float32_state():
    reference_inputs = scan_inputs(1, 37, 8)
    y_want, h_want = selective_scan_reference(*reference_inputs)
    inputs = [t.detach().bfloat16().requires_grad_() for t in reference_inputs]
    y, h = triton_scan.selective_scan_triton(*inputs)
    assert (y.dtype, h.dtype) == (torch.bfloat16, torch.float32)
    # bf16 rounds the inputs (relative 4e-3); a bf16 state would also round every one of the 37 steps.
    torch.testing.assert_close(h.double(), h_want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y_want, rtol=3e-2, atol=3e-2)
    (y.float().sum() + h.sum()).backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in inputs)


def test_triton_scan_without_gradients_gives_the_same_outputs():
    inputs = [t.detach().float() for t in scan_inputs(2, 20, 8)]
    y_want, h_want = selective_scan_reference(*inputs)
    with torch.no_grad():
        y, h = triton_scan.selective_scan_triton(*inputs)
    torch.testing.assert_close(y, y_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_want, rtol=1e-5, atol=1e-5)


def test_compiled_mamba_block_keeps_the_triton_scan_in_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    mamba = Mamba(16, d_state=4).to(DEVICE)
    mamba.scan = "triton"
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    conv, ssm = mamba.initial_state(2, DEVICE)
    want = mamba(x, conv, ssm)
    compiled = torch.compile(mamba, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    got = compiled(x, conv, ssm)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    (got[0].sum() + got[2].sum()).backward()
    assert x.grad is not None and counters["stats"]["unique_graphs"] == 1


def test_tiny_model_training_step_with_the_triton_scan_equals_the_blocked_scan():
    # The tiny preset, narrowed so that the interpreter runs each scan in one program per row.
    config = ModelConfig.preset(
        "tiny", vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32, window=16, n_memory=2, n_pauses=1
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (2, 32), generator=generator).to(DEVICE)
    targets = torch.randint(0, 64, (2, 32), generator=generator).to(DEVICE)
    results = {}
    for backend in ("triton", "blocked"):
        torch.manual_seed(0)
        model = use_scan_backend(BakaLM(config).to(DEVICE), backend)
        state = model.init_state(2)
        state = dataclasses.replace(
            state, ssm=tuple(torch.randn_like(s) for s in state.ssm)
        )  # a carried state, not zeros
        output = model(ids, state=state, targets=targets, return_logits=False)
        (output.loss + sum(s.sum() for s in output.state.ssm)).backward()
        results[backend] = [output.loss, *output.state.ssm, *(p.grad for p in model.parameters())]
    for got, want in zip(results["triton"], results["blocked"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_forced_triton_passes_its_self_check_and_is_refused_when_it_would_fail(monkeypatch):
    from bakallm.errors import UserError
    from bakallm.kernels import scan

    monkeypatch.setattr(scan, "_self_checks", {})
    assert scan.resolve_scan_backend("triton", DEVICE) == "triton"
    assert scan._self_checks == {("triton", DEVICE): None}
    monkeypatch.setattr(
        scan,
        "_self_checks",
        {("triton", DEVICE): "its results differ from the reference scan's by 3.0e-01 (relative)"},
    )
    with pytest.raises(
        UserError, match=r"failed its self-check against the reference scan on .*; choose --scan blocked or auto\.$"
    ):
        scan.resolve_scan_backend("triton", DEVICE)
