"""One Mamba block, forward and backward, against its peers at the shape of one window.

    python benchmarks/bench_mamba.py [--device cpu|cuda] [--batch-sizes 1 8] [--skip-slow-peers]

Compares our `bakallm.model.mamba.Mamba` (blocked scan, and on CUDA the Triton scan, with its conv and
SSM states carried in and out)
with `mambapy`'s MambaBlock (parallel pscan, starts from a zero state) and the PyTorch fallback of
`transformers`' MambaMixer (a token-by-token loop, the path taken without the `mamba_ssm`
kernels), all at d_model 768, d_state 16, expand 2, d_conv 4 on T = 552 positions (512 tokens,
8 pauses, 16 read and 16 write memory slots). It first checks that our fast scans give the
outputs and gradients of our sequential reference scan.

With --scan-table it also times the selective scan alone (forward + backward from a carried state,
d_inner 1536, d_state 16): our Triton and blocked scans, and on CUDA flash-linear-attention's
`fused_recurrent_hgrn` when `fla` imports. HGRN's recurrence h = exp(g) h + x is the Mamba scan
once d_inner x d_state is flattened into channels (x = (dt u) outer B, g = dt outer A, then
y = sum_n C h + D u), so that peer materialises [B, T, d_inner x d_state] tensors. Each scan's
time is also given against a memory floor: one copy that reads and writes as many bytes as the
scan's inputs and outputs (issue 8's target for the Triton scan: within 2x of it).
--triton-configs 32:8:8 16:32:8 ... adds the Triton scan with other tile lengths, channels per
program and warps (the defaults are in kernels/triton_scan.py), to tune them on a GPU.
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

D_MODEL, D_STATE, EXPAND, D_CONV = 768, 16, 2, 4
WINDOW_LENGTH = 552
OURS_PREFIX = "bakallm Mamba"
OURS, MAMBAPY, TRANSFORMERS = (
    f"{OURS_PREFIX} (blocked scan)",
    "mambapy MambaBlock (pscan)",
    "transformers MambaMixer (slow path)",
)
OURS_TRITON = f"{OURS_PREFIX} (triton scan)"
SCAN_TRITON, SCAN_BLOCKED, SCAN_FLA = "triton scan", "blocked scan", "fla fused_recurrent_hgrn (flattened)"
SCAN_IO_FLOOR = "memory floor: copy the scan's input and output bytes once"


def build_case(
    implementation: str,
    batch: int,
    length: int,
    device: torch.device,
    scan_sizes: tuple[int, int] | None = None,
    seed: int = 0,
):
    """The module and input of one implementation; returns a callable doing forward + backward.
    `scan_sizes` (block, chunk) overrides our blocked scan's defaults."""
    torch.manual_seed(seed)
    x = torch.randn(batch, length, D_MODEL, device=device, requires_grad=True)
    if implementation.startswith(OURS_PREFIX):
        from bakallm.model.mamba import Mamba

        block = Mamba(D_MODEL, D_STATE, D_CONV, EXPAND).to(device)
        block.scan = "triton" if implementation == OURS_TRITON else "blocked"
        if scan_sizes:
            block.scan_block, block.scan_chunk = scan_sizes
        conv_state, ssm_state = block.initial_state(batch, device)
        conv_state.normal_()
        ssm_state.normal_()

        def step():
            y, _, new_ssm_state = block(x, conv_state, ssm_state)
            (y.sum() + new_ssm_state.sum()).backward()

        return step
    if implementation == MAMBAPY:
        from mambapy.mamba import MambaBlock, MambaConfig

        block = MambaBlock(
            MambaConfig(d_model=D_MODEL, n_layers=1, d_state=D_STATE, expand_factor=EXPAND, d_conv=D_CONV)
        ).to(device)
    elif implementation == TRANSFORMERS:
        from transformers import MambaConfig
        from transformers.models.mamba.modeling_mamba import MambaMixer

        config = MambaConfig(
            hidden_size=D_MODEL,
            state_size=D_STATE,
            expand=EXPAND,
            conv_kernel=D_CONV,
            num_hidden_layers=1,
            use_mambapy=False,
        )
        block = MambaMixer(config, layer_idx=0).to(device).train()
    else:
        raise ValueError(f"unknown implementation {implementation!r}")

    def step():
        block(x).sum().backward()

    return step


def available_peers(skip_slow: bool) -> list[str]:
    peers = []
    for implementation, module in ((MAMBAPY, "mambapy"), (TRANSFORMERS, "transformers")):
        if implementation == TRANSFORMERS and skip_slow:
            continue
        try:
            __import__(module)
        except ImportError:
            print(f"{module} is not installed: {implementation} left out.")
            continue
        peers.append(implementation)
    return peers


def triton_usable(device: torch.device) -> bool:
    from bakallm.errors import UserError
    from bakallm.kernels.scan import resolve_scan_backend

    try:
        return resolve_scan_backend("triton", device) == "triton"
    except UserError as error:
        print(f"Triton scan left out: {error}")
        return False


def parity_check(device: torch.device, batch: int, length: int, backend: str = "blocked") -> float:
    """Max abs difference between a fast scan backend and the reference scan in one Mamba block:
    outputs, carried states and the gradients of the input, the incoming states and every parameter."""
    from bakallm.model.mamba import Mamba

    torch.manual_seed(0)
    block = Mamba(D_MODEL, D_STATE, D_CONV, EXPAND).to(device)
    x = torch.randn(batch, length, D_MODEL, device=device, requires_grad=True)
    conv_state, ssm_state = (state.normal_().requires_grad_() for state in block.initial_state(batch, device))
    results = {}
    for scan in (backend, "reference"):
        block.scan = scan
        outputs = block(x, conv_state, ssm_state)
        loss = sum((output * torch.linspace(-1, 1, output.shape[-1], device=device)).sum() for output in outputs)
        inputs = [x, conv_state, ssm_state, *block.parameters()]
        results[scan] = [output.detach() for output in outputs] + list(torch.autograd.grad(loss, inputs))
    names = ["y", "conv state", "ssm state", "grad x", "grad conv state", "grad ssm state"] + [
        f"grad {n}" for n, _ in block.named_parameters()
    ]
    differences = {
        name: (fast - ref).abs().max().item() for name, fast, ref in zip(names, results[backend], results["reference"])
    }
    worst = max(differences, key=differences.get)
    print(
        f"Parity, {backend} vs reference scan (B={batch}, T={length}, float32): max abs diff {differences[worst]:.2e} (in {worst}); "
        f"y {differences['y']:.2e}, ssm state {differences['ssm state']:.2e}, grad x {differences['grad x']:.2e}, grad A_log {differences['grad A_log']:.2e}"
    )
    return differences[worst]


def build_scan_case(
    implementation: str,
    batch: int,
    length: int,
    device: torch.device,
    d_inner: int = EXPAND * D_MODEL,
    triton_config=None,
):
    """Forward + backward of the selective scan alone from a carried state, at one block's shape;
    triton_config (tile, block_d, warps) sizes the Triton kernels."""
    from bakallm.kernels.scan import selective_scan

    torch.manual_seed(0)
    x = torch.randn(batch, length, d_inner, device=device, requires_grad=True)
    dt = (torch.rand(batch, length, d_inner, device=device) * 0.1).requires_grad_()
    A = (-torch.rand(d_inner, D_STATE, device=device) * 4).requires_grad_()
    B, C = (torch.randn(batch, length, D_STATE, device=device, requires_grad=True) for _ in range(2))
    D = torch.randn(d_inner, device=device, requires_grad=True)
    h0 = torch.randn(batch, d_inner, D_STATE, device=device, requires_grad=True)
    if implementation == SCAN_IO_FLOOR:
        # Each input and output of forward + backward read or written once: inputs x, dt, A, B, C, D,
        # h0 and the gradients of y and the final state; outputs y, the final state, and the
        # gradients of the seven inputs. Copying half of those bytes reads and writes all of them.
        inputs_and_outputs = 2 * (sum(t.numel() for t in (x, dt, A, B, C, D, h0)) + x.numel() + h0.numel())
        source = torch.empty(inputs_and_outputs // 2, device=device)
        target = torch.empty_like(source)

        def step():
            target.copy_(source)

        return step
    if implementation == SCAN_FLA:
        from fla.ops.hgrn import fused_recurrent_hgrn

        def scan():
            flat_x = ((dt * x).unsqueeze(-1) * B.unsqueeze(2)).flatten(2)
            flat_g = (dt.unsqueeze(-1) * A).flatten(2)
            states, h_last = fused_recurrent_hgrn(flat_x, flat_g, initial_state=h0.flatten(1), output_final_state=True)
            y = (states.view(batch, length, d_inner, D_STATE) * C.unsqueeze(2)).sum(-1) + D * x
            return y, h_last
    else:
        backend = "blocked" if implementation == SCAN_BLOCKED else "triton"

        def scan():
            return selective_scan(x, dt, A, B, C, D, h0, backend=backend)

    def step():
        if triton_config is not None:
            from bakallm.kernels import triton_scan

            triton_scan.TILE, triton_scan.MAX_BLOCK_D, triton_scan.NUM_WARPS = triton_config
        y, h_last = scan()
        (y.sum() + h_last.sum()).backward()

    return step


def scan_table(
    device: torch.device, batch_sizes: list[int], length: int, repeats: int, triton_configs: list[tuple[int, int, int]]
) -> None:
    """The scan alone against the blocked scan, and against the time to move its inputs and outputs
    once through the device's memory (issue 8's target: within 2x of that floor)."""
    implementations, configs = [SCAN_BLOCKED, SCAN_IO_FLOOR], {}
    if triton_usable(device):  # on CUDA; on a CPU only under TRITON_INTERPRET=1
        from bakallm.kernels import triton_scan

        default = (triton_scan.TILE, triton_scan.MAX_BLOCK_D, triton_scan.NUM_WARPS)
        for config in dict.fromkeys([default, *triton_configs]):
            name = (
                SCAN_TRITON
                if config == default
                else f"{SCAN_TRITON} (tile {config[0]}, {config[1]} channels, {config[2]} warps)"
            )
            configs[name] = config
            implementations.insert(len(configs) - 1, name)
    if device.type == "cuda":
        try:
            __import__("fla.ops.hgrn")
            implementations.append(SCAN_FLA)
        except ImportError as error:
            print(f"flash-linear-attention does not import ({error}): {SCAN_FLA} left out.")
    cases = {
        (name, batch): build_scan_case(name, batch, length, device, triton_config=configs.get(name))
        for batch in batch_sizes
        for name in implementations
    }
    peaks = {}
    times = {key: median(values) for key, values in interleaved_times(cases, repeats, device, peaks=peaks).items()}
    if configs:  # later calls get the default sizes again
        triton_scan.TILE, triton_scan.MAX_BLOCK_D, triton_scan.NUM_WARPS = default
    rows = []
    for (name, batch), seconds in times.items():
        blocked, floor = times[SCAN_BLOCKED, batch], times[SCAN_IO_FLOOR, batch]
        rows.append(
            [
                name,
                batch,
                length,
                f"{seconds * 1e3:.3f}",
                f"{batch * length / seconds:,.0f}",
                f"{blocked / seconds:.2f}x",
                f"{seconds / floor:.2f}x",
                format_bytes(peaks.get((name, batch))),
            ]
        )
    print()
    print(
        markdown_table(
            [
                "selective scan alone",
                "B",
                "T",
                "fwd+bwd ms",
                "tokens/s",
                "speed vs blocked",
                "time / I/O floor",
                "peak memory",
            ],
            rows,
        )
    )


def triton_config(text: str) -> tuple[int, int, int]:
    try:
        tile, block_d, warps = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TILE:CHANNELS:WARPS such as 16:16:8, got {text!r}") from None
    return tile, block_d, warps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--length", type=int, default=WINDOW_LENGTH)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed calls per case (median reported), after one warm-up"
    )
    parser.add_argument("--skip-slow-peers", action="store_true", help="leave out the transformers token-by-token path")
    parser.add_argument(
        "--slow-peer-max-batch",
        type=int,
        default=1,
        help="largest batch for the slow transformers path, which runs once, without warm-up",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--parity-batch", type=int, default=1)
    parser.add_argument(
        "--scan-table", action="store_true", help="also time the selective scan alone (triton, blocked, fla)"
    )
    parser.add_argument(
        "--triton-configs",
        type=triton_config,
        nargs="+",
        default=[],
        metavar="TILE:CHANNELS:WARPS",
        help="with --scan-table on CUDA, also time the Triton scan with these tile lengths, channels per program and warps",
    )
    parser.add_argument(
        "--scan-sizes",
        type=int,
        nargs=2,
        action="append",
        metavar=("BLOCK", "CHUNK"),
        help="also time our block with these blocked-scan block and sub-chunk sizes (repeatable)",
    )
    args = parser.parse_args()
    device = resolve_device(args)
    print(f"Machine: {machine_description(device)}")
    ours = [OURS_TRITON, OURS] if device.type == "cuda" and triton_usable(device) else [OURS]
    for implementation in ours:
        parity_check(device, args.parity_batch, args.length, "triton" if implementation == OURS_TRITON else "blocked")

    peers = available_peers(args.skip_slow_peers)
    variants = [f"{OURS_PREFIX} (blocked scan, block {block}, chunk {chunk})" for block, chunk in args.scan_sizes or []]
    scan_sizes = dict(zip(variants, args.scan_sizes or []))
    cases, repeats, cpu_single_runs = {}, {}, []
    for batch in args.batch_sizes:
        for implementation in [*ours, *variants, *peers]:
            key = (implementation, batch)
            slow = implementation == TRANSFORMERS
            if slow and batch > args.slow_peer_max_batch:
                continue
            if slow and device.type == "cpu":
                cpu_single_runs.append(key)  # its one call, in a fresh process, gives both time and memory
                continue
            cases[key] = build_case(implementation, batch, args.length, device, scan_sizes.get(implementation))
            repeats[key] = 1 if slow else args.repeats
    peaks = {}
    times = {key: median(values) for key, values in interleaved_times(cases, repeats, device, peaks=peaks).items()}
    del cases
    if device.type == "cpu":
        for key in [key for key in times if not args.no_memory] + cpu_single_runs:
            implementation, batch = key
            kwargs = {
                "implementation": implementation,
                "batch": batch,
                "length": args.length,
                "device": device,
                "scan_sizes": scan_sizes.get(implementation),
            }
            seconds, peaks[key] = cpu_peak_memory("bench_mamba:build_case", kwargs)
            times.setdefault(key, seconds)

    rows = []
    for batch in args.batch_sizes:
        baseline = times.get((MAMBAPY, batch))
        for implementation in [*ours, *variants, *peers]:
            key = (implementation, batch)
            if key not in times:
                rows.append([implementation, batch, args.length, "not run", "", ""])
                continue
            rate = batch * args.length / times[key]
            ratio = f"{baseline / times[key]:.2f}x" if baseline else "n/a"
            rows.append([implementation, batch, args.length, f"{rate:,.0f}", ratio, format_bytes(peaks.get(key))])
    print()
    print(markdown_table(["implementation", "B", "T", "tokens/s", "ratio vs mambapy", "peak memory"], rows))
    print(
        f"\nForward + backward of one block, median of {args.repeats} interleaved calls after a warm-up"
        f" (the transformers path: one call). Peak memory: extra bytes above the inputs and parameters."
    )
    if args.scan_table:
        scan_table(device, args.batch_sizes, args.length, args.repeats, args.triton_configs)


if __name__ == "__main__":
    main()
