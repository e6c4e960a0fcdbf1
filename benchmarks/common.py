"""Shared helpers of the benchmark scripts: devices, interleaved timing, peak memory, tables.

Timings of the implementations compared in one table are taken in the same process and
interleaved (one repeat of each case per round), and the median is reported, so that a machine
shared with other jobs slows every case alike.

Peak memory is the most extra memory a case needs while it runs, above what is allocated before
it starts (its inputs and parameters). On CUDA it comes from `torch.cuda.max_memory_allocated`
around the timed calls. On CPU PyTorch keeps no such counter, so the case runs once more in a fresh
process, which reports the rise of its peak resident set size (Linux's VmHWM, reset through
/proc/self/clear_refs) over its resident size before the call; a fresh process keeps memory freed
by other cases from hiding the rise. That first call also pays one-time allocations (thread pools,
library workspaces: tens of MiB), which dominate at small shapes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import multiprocessing
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: leave PyTorch's default)")


def resolve_device(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: PyTorch sees no CUDA device here; use --device cpu.")
    load, cores, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if device.type == "cpu" and threads > 1 and load > cores - threads + 0.5:
        print(
            f"Warning: other jobs keep the machine busy (load average {load:.1f} on {cores} cores); timings with {threads} threads will be erratic, consider --threads 1."
        )
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, PyTorch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    # Other jobs on the same cores slow multi-threaded PyTorch a lot (each parallel op waits for a
    # descheduled thread): the load average says how busy the machine was.
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} PyTorch threads, load average {load}, PyTorch {torch.__version__}"


def interleaved_times(
    cases: dict, repeats: int | dict, device: torch.device, warmup: int = 1, peaks: dict | None = None
) -> dict[object, list[float]]:
    """Seconds per call of every case. Each round runs every case that still has repeats left,
    so that load from other jobs falls on all of them. `repeats` may differ per case; a case run
    once gets no warm-up. On CUDA, `peaks` receives each case's peak extra bytes."""
    counts = repeats if isinstance(repeats, dict) else {name: repeats for name in cases}
    for name, case in cases.items():
        for _ in range(warmup if counts[name] > 1 else 0):
            case()
    times: dict[object, list[float]] = {name: [] for name in cases}
    for round_index in range(max(counts.values(), default=0)):
        for name, case in cases.items():
            if round_index >= counts[name]:
                continue
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            case()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda" and peaks is not None:
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device) - before)
    return times


def isolated_times(
    factory: str, cases: dict, repeats: int, rounds: int = 2, warmup: int = 1
) -> dict[object, list[float]]:
    """Seconds per call of every case, each case timed in fresh processes: `rounds` processes per
    case, one round of all cases after the other, each process building its case (`factory`, as
    for `cpu_peak_memory`, called with the case's kwargs), calling it `warmup` times untimed and
    timing `repeats` calls. On a CPU, cases sharing one process share its heap: glibc keeps the
    pages one model freed in the layout that model used, and another model's steps then run up to
    1.7x slower than in a process of their own (docs/performance.md, "Training throughput and
    MFU")."""
    times: dict[object, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, kwargs in cases.items():
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                times[name] += pool.apply(_timed_calls, (factory, kwargs, repeats, warmup, torch.get_num_threads()))
    return times


def _timed_calls(factory: str, kwargs: dict, repeats: int, warmup: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    case = _build_case(factory, kwargs)
    for _ in range(warmup):
        case()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        case()
        times.append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_peak_memory(factory: str, kwargs: dict) -> tuple[float, int]:
    """Seconds and peak extra resident bytes of the first call of the case that `factory` builds,
    run in a fresh process. `factory` is "module:function" (importable from this folder); called
    with `kwargs` it sets up the case and returns the callable to measure."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_first_call_peak, (factory, kwargs))


def _build_case(factory: str, kwargs: dict):
    """The callable that `factory` ("module:function", importable from this folder) builds from `kwargs`."""
    module_name, function_name = factory.split(":")
    return getattr(importlib.import_module(module_name), function_name)(**kwargs)


def _first_call_peak(factory: str, kwargs: dict) -> tuple[float, int]:
    case = _build_case(factory, kwargs)
    gc.collect()
    before = _resident_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    start = time.perf_counter()
    case()
    return time.perf_counter() - start, _resident_bytes("VmHWM") - before


def _resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; peak memory on CPU needs Linux.")


def format_bytes(count: float | None) -> str:
    if count is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
