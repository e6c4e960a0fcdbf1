"""The selective scan's one entry point: picks the backend that runs it (see SCAN_BACKENDS)."""

from __future__ import annotations

from types import ModuleType

import torch

from bakallm.errors import UserError
from bakallm.kernels import SCAN_BACKENDS
from bakallm.kernels.blocked import DEFAULT_BLOCK, DEFAULT_CHUNK
from bakallm.kernels.blocked import selective_scan as blocked_selective_scan
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


def resolve_scan_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a scan of tensors on `device`: "auto" becomes "triton" on CUDA when
    triton imports and "blocked" elsewhere; a forced backend that cannot run there raises UserError."""
    if backend not in SCAN_BACKENDS:
        raise UserError(f"Unknown scan backend {backend!r}; choose one of {', '.join(SCAN_BACKENDS)}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and not isinstance(_triton_scan(), str) else "blocked"
    if backend == "triton":
        module = _triton_scan()
        if isinstance(module, str):
            raise UserError(f"The triton scan backend needs the triton package, which does not import here ({module}); pip install triton, or choose --scan blocked.")
        if device.type != "cuda" and not (device.type == "cpu" and module.INTERPRETED):
            raise UserError(
                f"The triton scan backend runs on CUDA devices (on the CPU only under TRITON_INTERPRET=1, for tests), not on {device.type}; choose --scan blocked or auto."
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
    if backend == "reference":
        return selective_scan_reference(x, dt, A, B, C, D, h0)
    return blocked_selective_scan(x, dt, A, B, C, D, h0, block=block, chunk=chunk)

