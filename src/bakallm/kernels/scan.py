"""The selective scan's one entry point: picks the backend that runs it (see SCAN_BACKENDS)."""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from bakallm.errors import UserError
from bakallm.kernels import SCAN_BACKENDS
from bakallm.kernels.blocked import DEFAULT_BLOCK, DEFAULT_CHUNK
from bakallm.kernels.blocked import selective_scan as blocked_selective_scan
from bakallm.kernels.cpu_build import compiled_module, openmp_failure
from bakallm.kernels.cpu_scan import selective_scan as cpu_selective_scan
from bakallm.kernels.parallel import selective_scan as parallel_selective_scan
from bakallm.kernels.reference import selective_scan_reference

# The Triton module once imported, or why it did not import; filled on first use, so that CPU-only
# runs never pay for importing triton.
_triton: dict[str, ModuleType | str] = {}


def _triton_scan() -> ModuleType | str:
    """bakallm.kernels.triton_scan, or the reason it cannot be imported."""
    if not _triton:
        try:
            from bakallm.kernels import triton_scan

            _triton["module"] = triton_scan
        except ImportError as error:
            _triton["module"] = f"{error}"
    return _triton["module"]


# Per (backend, device): None once the compiled scan built there and matched the reference, else why not.
_self_checks: dict[tuple[str, torch.device], str | None] = {}
SELF_CHECK_TOLERANCE = 1e-3  # relative, on the outputs and every gradient of a small float32 case


def _self_check(backend: str, device: torch.device) -> str | None:
    """Runs the compiled scan `backend` ("triton" or "cpu") forward and backward on a small case on
    `device` (building its kernels there) and compares it with the reference scan: None if they
    agree, else what went wrong."""
    generator = torch.Generator().manual_seed(0)
    batch, length, d_inner, d_state = 2, 37, 16, 16
    shapes = (
        (batch, length, d_inner),
        (batch, length, d_inner),
        (d_inner, d_state),
        (batch, length, d_state),
        (batch, length, d_state),
        (d_inner,),
        (batch, d_inner, d_state),
    )
    results = []
    try:
        # Evaluation reaches the first scan under inference_mode: the check's tensors must not be
        # inference tensors, and it takes gradients.
        with torch.inference_mode(False), torch.enable_grad():
            values = [torch.randn(shape, generator=generator) for shape in shapes]
            values[1] = values[1].abs() * 0.1  # dt > 0
            values[2] = -values[2].abs()  # A < 0
            compiled = _triton_scan().selective_scan_triton if backend == "triton" else cpu_selective_scan
            for scan in (compiled, selective_scan_reference):
                inputs = [value.to(device).requires_grad_() for value in values]
                y, h = scan(*inputs)
                results.append([y, h, *torch.autograd.grad(y.square().sum() + h.sum(), inputs)])
    except Exception as error:  # a kernel that does not compile or run here, whatever the reason
        return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    for got, want in zip(*results):
        difference = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
        if not difference <= SELF_CHECK_TOLERANCE:
            return f"its results differ from the reference scan's by {difference:.1e} (relative)"
    return None


def self_check_failure(backend: str, device: torch.device) -> str | None:
    """Why the compiled scan `backend` is not used on `device` (None: it is). Triton kernels that
    pass their tests under Triton's interpreter may still fail to compile, or compute wrongly, with
    a given GPU and Triton version; the C++ scan needs a compiler and is built for this CPU. So the
    first use on a device builds and checks them once against the reference; inside a
    torch.compile trace the check is left to the eager calls."""
    if (backend, device) not in _self_checks:
        if torch.compiler.is_compiling():
            return None
        if backend == "cpu" and isinstance(compiled_module(), str):
            _self_checks[backend, device] = f"it could not be built here ({compiled_module()})"
        else:
            _self_checks[backend, device] = _self_check(backend, device)
    return _self_checks[backend, device]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A fallback's warning, once per process: every Mamba block resolves its backend at every call."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _warn_if_serial() -> None:
    reason = openmp_failure()
    if reason is not None and torch.get_num_threads() > 1:
        _warn_once(f"The compiled CPU scan runs on one thread: it could not be built with OpenMP here ({reason}).")


def resolve_scan_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a scan of tensors on `device`: "auto" becomes "triton" on CUDA when
    triton imports and the kernels pass their self-check there (else "parallel", with a warning when
    the self-check failed), "cpu" on a CPU when the C++ scan builds and passes its self-check (else
    "blocked", with a warning), "blocked" elsewhere; a forced backend that cannot run there raises UserError."""
    if backend not in SCAN_BACKENDS:
        raise UserError(f"Unknown scan backend {backend!r}; choose one of {', '.join(SCAN_BACKENDS)}.")
    if backend == "auto":
        if device.type == "cpu":
            failure = self_check_failure("cpu", device)
            if failure is not None:
                _warn_once(f"The compiled CPU scan is not used: {failure}; the blocked scan runs instead.")
                return "blocked"
            _warn_if_serial()
            return "cpu"
        # On a GPU the blocked scan's thousands of small operations per window are as many kernel
        # launches: without a working Triton scan, the log-depth scan (a few hundred) runs instead.
        if device.type != "cuda":
            return "blocked"
        if isinstance(_triton_scan(), str):
            return "parallel"
        failure = self_check_failure("triton", device)
        if failure is not None:
            _warn_once(
                f"The Triton scan failed its self-check on {device} ({failure}); the log-depth (parallel) scan runs instead."
            )
            return "parallel"
        return "triton"
    if backend == "cpu":
        if device.type != "cpu":
            raise UserError(f"The cpu scan backend runs on the CPU, not on {device.type}; choose --scan auto.")
        failure = self_check_failure("cpu", device)
        if failure is not None:
            raise UserError(f"The cpu scan backend cannot run: {failure}; choose --scan blocked or auto.")
        _warn_if_serial()
    if backend == "triton":
        module = _triton_scan()
        if isinstance(module, str):
            raise UserError(
                f"The triton scan backend needs the triton package, which does not import here ({module}); pip install triton, or choose --scan blocked."
            )
        if device.type != "cuda" and not (device.type == "cpu" and module.INTERPRETED):
            raise UserError(
                f"The triton scan backend runs on CUDA devices (on the CPU only under TRITON_INTERPRET=1, for tests), not on {device.type}; choose --scan blocked or auto."
            )
        failure = self_check_failure("triton", device)
        if failure is not None:
            raise UserError(
                f"The triton scan backend failed its self-check against the reference scan on {device} ({failure}); choose --scan blocked or auto."
            )
    return backend


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
    backend: str = "auto",
    block: int = DEFAULT_BLOCK,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, final state) of the Mamba-1 recurrence from h0 (shapes in reference.py) with the chosen
    backend; `block` and `chunk` size the blocked scan's work and change no result."""
    backend = resolve_scan_backend(backend, x.device)
    if backend == "triton":
        return _triton_scan().selective_scan_triton(x, dt, A, B, C, D, h0)
    if backend == "cpu":
        return cpu_selective_scan(x, dt, A, B, C, D, h0)
    if backend == "reference":
        return selective_scan_reference(x, dt, A, B, C, D, h0)
    if backend == "parallel":
        return parallel_selective_scan(x, dt, A, B, C, D, h0)
    return blocked_selective_scan(x, dt, A, B, C, D, h0, block=block, chunk=chunk)
