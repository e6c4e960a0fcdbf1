"""Training tokens/s of our presets and GPT-NeoX (Pythia-70m shape) alone and beside a busy neighbour.

    python benchmarks/bench_contention.py [--models tiny celp18 pythia-70m] [--batch-size 1] [--ctx 2048]
                                          [--steps 2] [--neighbour-threads 2]

For each model one training step (forward with targets, backward, clipping, AdamW; see
bench_train.py) is timed, median of `--steps` steps after a warm-up step, first with the machine to
itself, then while a second process multiplies 1024 x 1024 float32 matrices in a loop on
`--neighbour-threads` PyTorch threads (what another user's PyTorch job does to a shared CPU).
Slowdown = alone tokens/s / contended tokens/s; the last column divides each model's slowdown by
GPT-NeoX's, measured in the same run: a matmul-bound transformer is what a busy CPU costs least.
Run it under `flock /tmp/bakallm-measure.lock` on a shared machine and report the load average.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PYTHIA, build_case, pythia_config_path
from common import add_device_arguments, interleaved_times, machine_description, markdown_table, median, resolve_device

NEIGHBOUR = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
print("ready", flush=True)
while True:
    a @ b
"""


class BusyNeighbour:
    """A process that keeps `threads` cores busy with matmuls until the block ends."""

    def __init__(self, threads: int):
        self.threads = threads

    def __enter__(self) -> BusyNeighbour:
        self.process = subprocess.Popen(
            [sys.executable, "-c", NEIGHBOUR, str(self.threads)], stdout=subprocess.PIPE, text=True
        )
        self.process.stdout.readline()  # "ready": torch is imported and the loop starts
        time.sleep(0.5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.kill()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--models", nargs="+", default=["tiny", "celp18", PYTHIA])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=2048, help="tokens per row and step")
    parser.add_argument(
        "--steps", type=int, default=2, help="timed steps per model and condition, after one warm-up step"
    )
    parser.add_argument("--neighbour-threads", type=int, default=2)
    args = parser.parse_args()
    device = resolve_device(args)
    models = [name for name in args.models if name != PYTHIA or pythia_config_path().is_file()]
    print(f"Machine: {machine_description(device)}", flush=True)
    cases = {
        name: build_case(name, args.batch_size, args.ctx, device, torch.float32, "train", False) for name in models
    }
    tokens = args.batch_size * args.ctx
    alone = {name: tokens / median(seconds) for name, seconds in interleaved_times(cases, args.steps, device).items()}
    print("alone: " + ", ".join(f"{name} {rate:,.0f} tokens/s" for name, rate in alone.items()), flush=True)
    with BusyNeighbour(args.neighbour_threads):
        busy = {
            name: tokens / median(seconds)
            for name, seconds in interleaved_times(cases, args.steps, device, warmup=0).items()
        }
    slowdown = {name: alone[name] / busy[name] for name in models}
    rows = [
        [
            name,
            f"{args.batch_size}x{args.ctx}",
            f"{alone[name]:,.0f}",
            f"{busy[name]:,.0f}",
            f"{slowdown[name]:.2f}x",
            f"{slowdown[name] / slowdown[PYTHIA]:.2f}" if PYTHIA in slowdown else "n/a",
        ]
        for name in models
    ]
    print(
        markdown_table(
            [
                "model",
                "B x T",
                "tokens/s alone",
                f"tokens/s beside a {args.neighbour_threads}-thread matmul",
                "slowdown",
                "slowdown / GPT-NeoX's",
            ],
            rows,
        )
    )
    print(
        f"{torch.get_num_threads()} PyTorch threads; median of {args.steps} interleaved steps per condition; load average after: "
        + ", ".join(f"{value:.1f}" for value in __import__("os").getloadavg())
    )


if __name__ == "__main__":
    main()
