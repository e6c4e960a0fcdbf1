"""How long PyTorch's CPU threads spin at a barrier before they sleep, set before torch loads.

PyTorch runs each parallel CPU operation on GNU OpenMP threads, which wait at the operation's end
by spinning for up to GOMP_SPINCOUNT iterations (libgomp's default: 300,000) before sleeping.
Beside another job, a thread spinning there often waits for a partner that the scheduler has taken
off its core, and a celp18 training step runs thousands of such operations. Measured at 2 threads
beside a 2-thread matmul job (benchmarks/bench_train.py, docs/performance.md): a celp18 step took
34.2 s at the default and 23.6 s at 100,000; tiny 1.86 and 1.83 s, GPT-NeoX 5.70 and 5.60 s. On
a quiet machine the two were within 1% for all three. Shorter spins gain celp18 more (20.0 s at
10,000) but cost tiny, whose operations are so short and frequent that sleeping and waking
dominates (3.9 s at 10,000, 5.6 s at 30,000).

libgomp reads the variable once, when torch loads it: `bakallm`'s command line sets it before
anything imports torch, and benchmarks set it for the processes they start.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = 100_000


def shorten_openmp_spin(environment: MutableMapping[str, str] = os.environ) -> bool:
    """Sets GOMP_SPINCOUNT to SPIN_COUNT in `environment` unless the user chose a waiting policy
    (GOMP_SPINCOUNT or OMP_WAIT_POLICY set); returns whether it did. It takes effect in a process
    that has not imported torch yet and in the processes started after it."""
    if "GOMP_SPINCOUNT" in environment or "OMP_WAIT_POLICY" in environment:
        return False
    environment["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    return True
