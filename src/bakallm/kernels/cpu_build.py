"""Building the C++ CPU kernels (cpu_scan.cpp, cpu_fused.cpp) into one extension for this machine.

They are compiled on first use with the machine's C++ compiler (`torch.utils.cpp_extension`,
about 40 s on two cores, then cached under `TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions) for
this CPU's instruction set. Where they cannot be built, `compiled_module()` returns why (no
compiler, a compiler error): the scan backend "auto" then falls back to the blocked scan
(kernels/scan.py), and the fused passes (kernels/cpu_fused.py) to their PyTorch operations.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).parent
SOURCES = tuple(HERE / name for name in ("cpu_scan.cpp", "cpu_fused.cpp", "cpu_bindings.cpp"))
# -ffast-math lets the compiler vectorise exp over a block's channels (glibc's vector math library);
# the parity tests hold the results to the PyTorch references'.
COMPILER_FLAGS = ("-O3", "-march=native", "-ffast-math")
# -fopenmp makes at::parallel_for (inline in ATen's headers) run the tasks on PyTorch's threads,
# linked to the libgomp.so.1 that torch has already loaded. Where OpenMP cannot be built (clang
# without libomp), the second build's tasks run one after another: same results, one thread.
THREADING_FLAGS = (("-fopenmp",), ("-fopenmp-simd",))

_built: dict[str, ModuleType | str | None] = {}
# Left in a build's directory when it failed: the next process reports it at once instead of
# spending another forty seconds failing (a machine without OpenMP would pay it at every start).
FAILED_BUILD = "bakallm-build-failed.txt"


def _cpu_signature(flags: list[str]) -> str:
    """What the compiled code depends on besides its sources: -march=native ties it to this CPU."""
    try:
        cpu = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    sources = " ".join(source.read_text() for source in SOURCES)
    text = f"{platform.machine()} {cpu} {' '.join(flags)} {sources}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def compiled_module() -> ModuleType | str:
    """The compiled extension, or why it could not be built (built once per process)."""
    if not _built:
        from torch.utils.cpp_extension import _get_build_directory, load

        failures = []
        for threading in THREADING_FLAGS:
            flags = [*COMPILER_FLAGS, *threading]
            name = f"bakallm_cpu_kernels_{_cpu_signature(flags)}"
            directory = None
            try:
                directory = Path(_get_build_directory(name, verbose=False))
                if (directory / FAILED_BUILD).exists():
                    reason = (directory / FAILED_BUILD).read_text().strip()
                    failures.append(f"{reason} (when last tried; delete {directory} to try again)")
                    continue
                if not failures and not any(directory.glob(f"{name}*.so")):
                    # Forty seconds of silence would look like a hang, at the start of a user's first run.
                    print("bakallm: building the CPU kernels for this machine (once, about 40 s)", file=sys.stderr)
                # Fresh lists: load() appends its own flags to them.
                _built["module"] = load(
                    name=name,
                    sources=[str(source) for source in SOURCES],
                    extra_cflags=list(flags),
                    extra_ldflags=list(threading),
                    verbose=False,
                )
                break
            except Exception as error:  # no compiler, no ninja, a compiler error: PyTorch operations run instead
                failures.append(f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}")
                if directory is not None:
                    with contextlib.suppress(OSError):
                        (directory / FAILED_BUILD).write_text(failures[-1])
        else:
            _built["module"] = failures[0]
        _built["openmp_failure"] = failures[0] if failures else None
    return _built["module"]


def openmp_failure() -> str | None:
    """Why the kernels that were built run their tasks on one thread (None: on PyTorch's threads,
    or nothing could be built)."""
    return None if isinstance(compiled_module(), str) else _built["openmp_failure"]
