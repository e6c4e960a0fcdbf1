"""Optional accelerations applied to a model from outside, so that the model code stays plain."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Iterable

import torch

from bakallm.model.network import BakaLM


def compile_layers(model: BakaLM, backend: str = "inductor") -> BakaLM:
    """torch.compile each block with static shapes (as torchtitan does per transformer block).

    Compiling per block keeps compile time bounded: the window loop and the state handling stay
    in Python, and every block sees the same shapes in every full window.
    """
    for layer in model.layers:
        layer.compile(dynamic=False, backend=backend)
    return model


def checkpoint_layers(blocks: Iterable[torch.nn.Module]) -> None:
    """Activation checkpointing per block: a block keeps only its inputs for the backward pass and
    runs its forward again there, so the activations inside blocks (attention, the gated MLP, the
    Mamba expansion) are never all held at once. About one more forward pass of compute.

    Applied from outside, as compile is, to the blocks a model kind names (bakallm.kinds): the
    model's code and its saved weights do not change.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def use_scan_backend(model: BakaLM, backend: str) -> BakaLM:
    """Runs every Mamba block's selective scan with `backend` (see bakallm.kernels.SCAN_BACKENDS).

    Checked now against the model's device, so that a forced backend that cannot run there fails
    here rather than in the first forward pass ("auto" is resolved at each call, from the device
    of the scan's inputs).
    """
    from bakallm.kernels.scan import resolve_scan_backend

    resolve_scan_backend(backend, model.embed.weight.device)
    for layer in model.layers:
        if layer.mamba is not None:
            layer.mamba.scan = backend
    return model


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_AT_MOST = 2**31 - 1  # mallopt takes an int: give back only a free top of the heap over 2 GiB


def keep_freed_host_memory() -> bool:
    """Makes glibc serve every allocation from the heap and keep freed memory for reuse; returns
    whether it did (Linux with glibc, and the user set no MALLOC_* or GLIBC_TUNABLES of their own).

    By default glibc maps each block over 32 MB afresh and unmaps it when freed, so every training
    step on a CPU faults its large buffers (the output layer's chunk of logits, its gradients) in
    again page by page. Measured on 2 cores (docs/performance.md): benchmark steps 7-19% shorter
    for our presets and GPT-NeoX alike, celp18's steps in `bakallm train` about 5%; peak memory
    0-11% higher for our presets and 43% for GPT-NeoX,
    whose whole logits, freed in blocks of differing sizes, fragment the kept heap. PyTorch's own
    CPU launcher gets the same by preloading tcmalloc or jemalloc. Applies to the whole process,
    from the next allocation on.
    """
    if platform.libc_ver()[0] != "glibc" or "GLIBC_TUNABLES" in os.environ:
        return False
    if any(name.startswith("MALLOC_") for name in os.environ):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_AT_MOST))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        from bakallm.errors import UserError

        raise UserError(f"--device {name} was asked for but PyTorch sees no CUDA device; pass --device cpu.")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name: bfloat16 on CUDA by default, none (float32) on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if precision == "bfloat16" else None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as set by taskset or a container), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_threads(threads: int | None) -> int:
    """Sets PyTorch's CPU threads: `threads`, else OMP_NUM_THREADS when the user set it, else this
    process's share of the CPUs it may use (all of them, divided among the ranks that torchrun starts
    on this node); returns the count.

    Under torchrun OMP_NUM_THREADS is ignored: torchrun sets it to 1 itself whenever the user did
    not, which would leave all but one CPU of each rank's share idle (use --threads there).
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    from_environment = os.environ.get("OMP_NUM_THREADS", "").strip()
    if (
        threads is None
        and "LOCAL_WORLD_SIZE" not in os.environ
        and from_environment.isdigit()
        and int(from_environment) > 0
    ):
        threads = int(from_environment)
    count = threads or max(1, available_cpus() // ranks_here)
    torch.set_num_threads(count)
    return count
