"""The compiled CPU passes (kernels/cpu_fused.cpp) against the PyTorch operations they replace:
forward and backward of each at celp18's shapes.

    python benchmarks/bench_cpu_fused.py [--threads 1] [--repeats 20]

Each pass runs through the model's own function, once with the compiled kernels and once with
them turned off (the PyTorch path, which is their reference and what a GPU runs), interleaved,
with freed host memory kept for reuse as `bakallm train` keeps it (otherwise every fresh output
of a few MB is faulted in page by page, and the passes' times vary by a third between runs).
"per step" multiplies the saving by the pass's calls in a celp18 training step at 1 x 2048 tokens
(4 windows x 8 layers; the rotation turns the query, the key and, from the second window, the
previous window's keys).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bakallm.acceleration import keep_freed_host_memory
from bakallm.kernels import cpu_fused
from bakallm.kernels.cpu_build import compiled_module
from bakallm.model.elephant import elephant_gate
from bakallm.model.mamba import Mamba
from bakallm.model.network import RMSNorm
from bakallm.model.rotary import apply_rotary
from common import interleaved_times, machine_description, markdown_table, median

LAYER_WINDOWS = 32  # celp18 at 1 x 2048: 8 layers x 4 windows


@contextmanager
def compiled_kernels(enabled: bool):
    """The model's functions with the compiled passes, or with their PyTorch operations."""
    built = cpu_fused.compiled_module
    if not enabled:
        cpu_fused.compiled_module = lambda: "turned off by the benchmark"
    try:
        yield
    finally:
        cpu_fused.compiled_module = built


def leaf(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).requires_grad_()


def backward(out: torch.Tensor | tuple[torch.Tensor, ...], inputs: list[torch.Tensor]) -> None:
    outputs = out if isinstance(out, tuple) else (out,)
    torch.autograd.grad(outputs, inputs, [torch.ones_like(o) for o in outputs])


def elephant_case():
    up, gate = leaf(552, 3072), leaf(552, 3072, scale=1.5)
    return lambda: backward(elephant_gate(up, gate), [up, gate])


def convolution_case():
    mamba = Mamba(768)
    hidden, state = leaf(1, 552, mamba.d_inner), torch.randn(1, mamba.d_inner, mamba.d_conv - 1)
    return lambda: backward(mamba._causal_conv(hidden, state), [hidden, *mamba.conv.parameters()])


def norm_case():
    norm, x = RMSNorm(768, eps=1e-6), leaf(1, 552, 768)
    return lambda: backward(norm(x), [x, norm.weight])


def rotation_case():
    qkv = leaf(1, 552, 3, 12, 64)
    cos, sin = torch.randn(552, 64), torch.randn(552, 64)
    query = qkv.permute(2, 0, 3, 1, 4)[0]  # the attention's layout: a view of its fused projection
    return lambda: backward(apply_rotary(query, cos, sin), [qkv])


# name, shape, case factory, calls per celp18 step
PASSES = [
    ("Elephant gate", "552 x 3072", elephant_case, LAYER_WINDOWS),
    ("Mamba convolution + SiLU", "1 x 552 x 1536, 4 taps", convolution_case, LAYER_WINDOWS),
    ("RMSNorm", "1 x 552 x 768", norm_case, 2 * LAYER_WINDOWS + 4),
    ("rotary embedding", "1 x 12 x 552 x 64 (a view)", rotation_case, 2 * LAYER_WINDOWS + 24),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    built = compiled_module()
    if isinstance(built, str):
        sys.exit(f"The CPU kernels do not build here ({built}); nothing to compare.")
    keep_freed_host_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, total = [], 0.0
    for name, shape, factory, calls in PASSES:
        case = factory()  # the same inputs for both

        def run(enabled: bool, case=case) -> None:
            with compiled_kernels(enabled):
                case()

        cases = {enabled: partial(run, enabled) for enabled in (False, True)}
        times = interleaved_times(cases, args.repeats, torch.device("cpu"), warmup=2)
        pytorch, compiled = median(times[False]), median(times[True])
        saved = (pytorch - compiled) * calls
        total += saved
        rows.append(
            [
                name,
                shape,
                f"{pytorch * 1e3:.2f}",
                f"{compiled * 1e3:.2f}",
                f"{pytorch / compiled:.2f}x",
                calls,
                f"{saved * 1e3:.0f} ms",
            ]
        )
    print(f"Machine: {machine_description(torch.device('cpu'))}, {args.threads} thread(s)\n")
    headers = ["pass", "shape", "PyTorch fwd+bwd ms", "compiled fwd+bwd ms", "speed-up", "calls/step", "saved/step"]
    print(markdown_table(headers, rows))
    print(f"\nmedians of {args.repeats} interleaved repeats; saved in a celp18 step at 1 x 2048 in all: {total:.2f} s")


if __name__ == "__main__":
    main()
