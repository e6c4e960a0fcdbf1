"""The peak memory of a scoring run, on CUDA and on a Linux CPU."""

from __future__ import annotations

from pathlib import Path

import torch

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
# Writing this to /proc/self/clear_refs resets the process's resident-memory high-water mark (VmHWM).
_RESET_PEAK_RSS = "5"


class PeakMemory:
    """Peak memory of the work done between construction and `peak_bytes()`.

    On CUDA: the most memory torch held allocated on the device (weights included). On a Linux CPU:
    how far the process's resident memory rose above its size at construction, read from the
    kernel's high-water mark (VmHWM) after resetting it, so no sampling thread is needed and the
    weights loaded beforehand do not count. Elsewhere: None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._resident_at_start: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "cpu":
            self._resident_at_start = _reset_resident_peak()

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._resident_at_start is None:
            return None
        return max(_proc_status_bytes("VmHWM") - self._resident_at_start, 0)


def _reset_resident_peak() -> int | None:
    """Resets VmHWM and returns the resident size now, or None where /proc does not allow it."""
    try:
        _PROC_CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        return _proc_status_bytes("VmRSS")
    except (OSError, ValueError):
        return None


def _proc_status_bytes(field: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise ValueError(f"{_PROC_STATUS} has no {field} line")
