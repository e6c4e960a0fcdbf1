"""conftest.scan_slices_at_once speeds up Triton's interpreter: it must scan exactly as the
interpreter's own element-by-element version does, forward and reverse."""

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("on a GPU the Triton kernels are compiled, not interpreted", allow_module_level=True)
triton = pytest.importorskip("triton", reason="triton does not import (pip install triton)")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import ScanOps  # noqa: E402

if not hasattr(ScanOps, "element_by_element_scan"):
    pytest.skip("conftest did not replace the interpreter's scan", allow_module_level=True)


@triton.jit
def _linear_recurrence(a_before, b_before, a_after, b_after):
    return a_before * a_after, a_after * b_before + b_after


@triton.jit
def _scan_kernel(
    a_ptr,
    b_ptr,
    a_out_ptr,
    b_out_ptr,
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,
    AXIS: tl.constexpr,
    REVERSE: tl.constexpr,
):
    index = tl.arange(0, ROWS)[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :]
    a, b = tl.associative_scan(
        (tl.load(a_ptr + index), tl.load(b_ptr + index)), AXIS, _linear_recurrence, reverse=REVERSE
    )
    tl.store(a_out_ptr + index, a)
    tl.store(b_out_ptr + index, b)


def scan(a, b, axis, reverse):
    a_out, b_out = torch.empty_like(a), torch.empty_like(b)
    _scan_kernel[(1,)](a, b, a_out, b_out, a.shape[0], a.shape[1], axis, reverse)
    return a_out, b_out


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("reverse", [False, True])
def test_slice_scan_equals_the_interpreters_element_by_element_scan(monkeypatch, axis, reverse):
    a, b = torch.rand(8, 4), torch.randn(8, 4)
    got = scan(a, b, axis, reverse)
    monkeypatch.setattr(ScanOps, "generic_scan", ScanOps.element_by_element_scan)
    want = scan(a, b, axis, reverse)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # And both are the recurrence h = a h + b along the axis (from the far end when reversed).
    a_moved, b_moved = (t.movedim(axis, 0) for t in (a, b))
    steps = range(a_moved.shape[0] - 1, -1, -1) if reverse else range(a_moved.shape[0])
    h = torch.zeros_like(b_moved[0])
    expected = torch.empty_like(b_moved)
    for step in steps:
        h = a_moved[step] * h + b_moved[step]
        expected[step] = h
    torch.testing.assert_close(got[1], expected.movedim(0, axis))
