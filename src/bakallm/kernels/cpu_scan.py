"""The selective scan as one compiled C++ loop per block of channels, for CPUs (cpu_scan.cpp).

The blocked scan (blocked.py) runs thousands of small PyTorch operations per window; on a CPU
each costs microseconds of dispatch and a pass through memory. This kernel keeps a block of
channels' states in a local array, one channel per vector lane, and does a step in a few vector
instructions per state; forward keeps the state
entering every 16th step, backward recomputes each 16-step segment from it and runs the adjoint
recurrence through it (the maths is in the .cpp file's comments; the reference is reference.py).

It is compiled on first use with the machine's C++ compiler (`torch.utils.cpp_extension`, about
half a minute, then cached under `TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions) for this
CPU's instruction set. Where it cannot be built, `compiled_module()` returns why (no compiler, a
compiler error), and the scan backend "auto" falls back to the blocked scan, as it does when the
kernel's results differ from the reference scan's (kernels/scan.py, `self_check_failure`).
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import sys
from pathlib import Path
from types import ModuleType

import torch

from bakallm.kernels.reference import scan_operands

SOURCE = Path(__file__).with_name("cpu_scan.cpp")
# -ffast-math lets the compiler vectorise exp over a block's channels (glibc's vector math library);
# the parity tests hold the results to the reference scan's in float64.
COMPILER_FLAGS = ("-O3", "-march=native", "-ffast-math")
# -fopenmp makes at::parallel_for (inline in ATen's headers) run the tasks on PyTorch's threads,
# linked to the libgomp.so.1 that torch has already loaded. Where OpenMP cannot be built (clang
# without libomp), the second build's tasks run one after another: same results, one thread.
THREADING_FLAGS = (("-fopenmp",), ("-fopenmp-simd",))

_built: dict[str, ModuleType | str | None] = {}
# Left in a build's directory when it failed: the next process reports it at once instead of
# spending another half minute failing (a machine without OpenMP would pay it at every start).
FAILED_BUILD = "bakallm-build-failed.txt"


def _cpu_signature(flags: list[str]) -> str:
    """What the compiled code depends on besides its source: -march=native ties it to this CPU."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    text = f"{platform.machine()} {cpu} {' '.join(flags)} {SOURCE.read_text()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def compiled_module() -> ModuleType | str:
    """The compiled extension, or why it could not be built (built once per process)."""
    if not _built:
        from torch.utils.cpp_extension import _get_build_directory, load

        failures = []
        for threading in THREADING_FLAGS:
            flags = [*COMPILER_FLAGS, *threading]
            name = f"bakallm_cpu_scan_{_cpu_signature(flags)}"
            directory = None
            try:
                directory = Path(_get_build_directory(name, verbose=False))
                if (directory / FAILED_BUILD).exists():
                    reason = (directory / FAILED_BUILD).read_text().strip()
                    failures.append(f"{reason} (when last tried; delete {directory} to try again)")
                    continue
                if not failures and not any(directory.glob(f"{name}*.so")):
                    # Half a minute of silence would look like a hang, at the start of a user's first run.
                    print("bakallm: building the CPU scan kernel for this machine (once, about 30 s)", file=sys.stderr)
                # Fresh lists: load() appends its own flags to them.
                _built["module"] = load(
                    name=name,
                    sources=[str(SOURCE)],
                    extra_cflags=list(flags),
                    extra_ldflags=list(threading),
                    verbose=False,
                )
                break
            except Exception as error:  # no compiler, no ninja, a compiler error: the blocked scan runs instead
                failures.append(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}")
                if directory is not None:
                    with contextlib.suppress(OSError):
                        (directory / FAILED_BUILD).write_text(failures[-1])
        else:
            _built["module"] = failures[0]
        _built["openmp_failure"] = failures[0] if failures else None
    return _built["module"]


def openmp_failure() -> str | None:
    """Why the kernel that was built runs its tasks on one thread (None: on PyTorch's threads, or
    nothing could be built)."""
    return None if isinstance(compiled_module(), str) else _built["openmp_failure"]


class _CpuSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0):
        kernel = compiled_module()
        needs_gradients = any(ctx.needs_input_grad)
        y, h_last, checkpoints = kernel.forward(x, dt, A, B, C, D, h0, needs_gradients)
        if needs_gradients:
            ctx.save_for_backward(x, dt, A, B, C, D, checkpoints)
        return y, h_last

    @staticmethod
    def backward(ctx, grad_y, grad_h_last):
        x, dt, A, B, C, D, checkpoints = ctx.saved_tensors
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous().to(x.dtype)
        grad_h_last = (
            torch.zeros(x.shape[0], *A.shape, dtype=x.dtype) if grad_h_last is None else grad_h_last.contiguous()
        )
        return tuple(compiled_module().backward(x, dt, A, B, C, D, checkpoints, grad_y, grad_h_last.to(x.dtype)))


# Runs eagerly inside compiled models, as the blocked scan does.
@torch.compiler.disable
def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled scan with the reference's signature; computes in float32, or float64 for
    float64 inputs. Call `compiled_module()` first where a failed build must be handled."""
    tensors = scan_operands(x, dt, A, B, C, D, h0)
    return _CpuSelectiveScan.apply(*tensors)
