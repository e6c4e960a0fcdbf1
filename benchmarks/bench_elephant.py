"""The fused Elephant gate against the plain formula: time and memory of forward + backward.

    python benchmarks/bench_elephant.py [--device cpu|cuda] [--shape 8 552 3072] [--dtype float32]

`elephant_gate(up, gate, fused=True)` (hand-written backward that saves only its inputs) against
`fused=False` (the formula `up / (1 + |gate/a|^d)` differentiated by autograd), at the shape of
the MLP's hidden activations for 8 windows of 552 positions. Memory is reported two ways: the
bytes autograd saves for backward beyond the two inputs, and the peak extra memory of one forward
and backward above the inputs (see benchmarks/common.py for how it is measured).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_device_arguments,
    cpu_peak_memory,
    format_bytes,
    interleaved_times,
    machine_description,
    markdown_table,
    median,
    resolve_device,
)

VARIANTS = {"fused": True, "plain": False}


def make_inputs(shape, device, dtype, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    up, gate, grad_out = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(3))
    return up.requires_grad_(), gate.mul_(1.5).requires_grad_(), grad_out


def build_case(variant: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, a: float, d: float):
    """Returns a callable running forward and backward of one gate variant."""
    from bakallm.model.elephant import elephant_gate

    up, gate, grad_out = make_inputs(shape, device, dtype)

    def step():
        out = elephant_gate(up, gate, a, d, fused=VARIANTS[variant])
        torch.autograd.grad(out, (up, gate), grad_out)

    return step


def saved_bytes(variant: str, shape, device, dtype, a: float, d: float) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, other than the two inputs."""
    from bakallm.model.elephant import elephant_gate

    up, gate, _ = make_inputs(shape, device, dtype)
    inputs = {up.untyped_storage().data_ptr(), gate.untyped_storage().data_ptr()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        elephant_gate(up, gate, a, d, fused=VARIANTS[variant])
    return sum(storages.values())


def parity(shape, device, dtype, a: float, d: float) -> float:
    """Largest difference between the fused gate's output and gradients and the plain formula's,
    relative to the largest magnitude of each (so that bfloat16 is judged by its precision)."""
    from bakallm.model.elephant import elephant_gate

    up, gate, grad_out = make_inputs(shape, device, dtype)
    results = []
    for fused in (True, False):
        out = elephant_gate(up, gate, a, d, fused=fused)
        results.append([out.detach(), *torch.autograd.grad(out, (up, gate), grad_out)])
    return max(((f.float() - p.float()).abs().max() / p.float().abs().max()).item() for f, p in zip(*results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 552, 3072])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--a", type=float, default=1.0)
    parser.add_argument("--d", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = resolve_device(args)
    dtype = getattr(torch, args.dtype)
    shape = tuple(args.shape)
    print(f"Machine: {machine_description(device)}")
    difference = parity(shape[-2:], device, dtype, args.a, args.d)
    print(f"Parity, fused vs plain at {shape[-2:]} {args.dtype}: max abs diff / max abs value {difference:.2e}")

    cases = {variant: build_case(variant, shape, device, dtype, args.a, args.d) for variant in VARIANTS}
    peaks = {}
    times = {
        variant: median(values)
        for variant, values in interleaved_times(cases, args.repeats, device, peaks=peaks).items()
    }
    del cases
    tensor_bytes = torch.Size(shape).numel() * dtype.itemsize
    rows = []
    for variant, fused in VARIANTS.items():
        if device.type == "cpu":
            kwargs = {"variant": variant, "shape": shape, "device": device, "dtype": dtype, "a": args.a, "d": args.d}
            _, peaks[variant] = cpu_peak_memory("bench_elephant:build_case", kwargs)
        saved = saved_bytes(variant, shape, device, dtype, args.a, args.d)
        rows.append(
            [
                f"elephant_gate(fused={fused})",
                f"{times[variant] * 1e3:.1f}",
                f"{times['plain'] / times[variant]:.2f}x",
                f"{format_bytes(saved)} ({saved / tensor_bytes:.1f})",
                f"{format_bytes(peaks[variant])} ({peaks[variant] / tensor_bytes:.1f})",
            ]
        )
    print()
    print(
        f"Shape {'x'.join(map(str, shape))} {args.dtype}, a={args.a}, d={args.d}; in brackets: multiples of one such tensor ({format_bytes(tensor_bytes)})."
    )
    print()
    print(markdown_table(["variant", "fwd+bwd ms", "speed vs plain", "saved for backward", "peak extra memory"], rows))
    print(
        f"\nFused / plain peak extra memory: {peaks['fused'] / peaks['plain']:.2f}; median of {args.repeats} interleaved calls."
    )


if __name__ == "__main__":
    main()
