"""The compiled CPU scan against the blocked scan, the selective scan alone.

    python benchmarks/bench_cpu_scan.py [--threads N] [--repeats 5]

For each shape (rows, positions, d_inner; d_state 16): forward and backward through autograd
(loss = sum of the outputs and of the final state) and forward alone under no_grad, medians of
interleaved repeats after a warm-up call, in one process. Builds the C++ scan first (about 30 s the
first time on a machine) and stops with its reason when it cannot be built.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bakallm.kernels.blocked import selective_scan as blocked_scan
from bakallm.kernels.cpu_scan import compiled_module
from bakallm.kernels.cpu_scan import selective_scan as compiled_scan
from common import machine_description, markdown_table, median

SHAPES = [(1, 552, 1536, "celp18, one row"), (8, 552, 1536, "celp18, 8 rows"), (1, 148, 256, "tiny")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (0: leave PyTorch's default)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    built = compiled_module()
    if isinstance(built, str):
        sys.exit(f"The C++ scan cannot be built here: {built}")
    print(f"# Selective scan on the CPU ({machine_description(torch.device('cpu'))})\n")
    rows = []
    for batch, length, channels, label in SHAPES:
        generator = torch.Generator().manual_seed(0)
        inputs = [
            torch.randn(batch, length, channels, generator=generator),
            torch.rand(batch, length, channels, generator=generator) * 0.1,
            -torch.rand(channels, 16, generator=generator),
            torch.randn(batch, length, 16, generator=generator),
            torch.randn(batch, length, 16, generator=generator),
            torch.ones(channels),
            torch.randn(batch, channels, 16, generator=generator),
        ]
        inputs = [tensor.requires_grad_() for tensor in inputs]

        def train(scan):
            y, h = scan(*inputs)
            (y.sum() + h.sum()).backward()

        def forward(scan):
            with torch.no_grad():
                scan(*inputs)

        times = {}
        for mode, run in (("fwd+bwd", train), ("fwd", forward)):
            for scan in (blocked_scan, compiled_scan):
                run(scan)
            measured = {blocked_scan: [], compiled_scan: []}
            for _ in range(args.repeats):
                for scan in measured:
                    start = time.perf_counter()
                    run(scan)
                    measured[scan].append(time.perf_counter() - start)
            times[mode] = (median(measured[blocked_scan]), median(measured[compiled_scan]))
        row = [f"{batch}, {length}, {channels} ({label})"]
        for blocked, compiled in times.values():
            row += [f"{blocked * 1e3:,.1f} ms", f"{compiled * 1e3:,.1f} ms", f"{blocked / compiled:.1f}x"]
        rows.append(row)
        print(f"{label} done", file=sys.stderr, flush=True)
    header = ["shape (rows, positions, d_inner)", "blocked fwd+bwd", "compiled fwd+bwd", "speed-up"]
    print(markdown_table(header + ["blocked fwd", "compiled fwd", "speed-up"], rows))
    print(f"\nload average after: {', '.join(f'{value:.1f}' for value in os.getloadavg())}")


if __name__ == "__main__":
    main()
