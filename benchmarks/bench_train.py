"""Training (and optionally evaluation) throughput and MFU of our presets beside GPT-NeoX (Pythia-70m).

    python benchmarks/bench_train.py [--models tiny celp18 pythia-70m] [--batch-size 1] [--ctx 2048]
                                     [--steps 2] [--device cpu|cuda] [--dtype float32|bfloat16]
                                     [--compile] [--eval] [--activation-checkpointing]
                                     [--peak-tflops X] [--profile MODEL]

A training step is: forward with targets (our model with return_logits=False), backward, gradient
clipping to norm 1, AdamW step. Every model trains on the same random token ids. On a CPU each
model is timed in fresh processes of its own, alternating between models (--rounds processes per
model, --steps steps each after --warmup-steps untimed ones): in one shared process a model's
freed memory slows the next model's steps. Step times are medians; --same-process interleaves
steps in this process instead (always so on CUDA).

Model FLOPs per input token (docs/performance.md):

    6 * N_layers * P + 6 * N_out + 12 * n_layers * d_model * A

N_layers: parameters of the matrix multiplications inside the layers (every nn.Linear except the
output projection); P: positions the layers process per input token (1 for GPT-NeoX, 552/512 for
our windows of 16 read slots + 512 tokens + 8 pauses + 16 write slots); N_out: parameters of the
output projection, applied once per token; A: (query, key) pairs attended per input token and
layer (keys in the causal past, plus for our windows the previous window's keys when there is
one). Embedding lookups, norms, the Mamba convolution and selective scan are not counted (the scan
is under 1% of the matmul FLOPs of celp18). Evaluation counts a third of these (forward only).
MFU = FLOPs per token * tokens/s / peak FLOP/s, the peak being a large matmul in the run's dtype
measured in the same run, or --peak-tflops (e.g. 989 for bf16 dense on H100/H200).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bakallm.kernels import SCAN_BACKENDS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    add_device_arguments,
    cpu_peak_memory,
    format_bytes,
    interleaved_times,
    isolated_times,
    machine_description,
    markdown_table,
    median,
    resolve_device,
    synchronize,
)

PYTHIA = "pythia-70m"
CHECKPOINTED = "train-checkpointed"
DEFAULT_PYTHIA_CONFIG = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "configs" / "pythia-70m-deduped" / "config.json"
)


def pythia_config_path() -> Path:
    return Path(os.environ.get("BAKALLM_PYTHIA_CONFIG", DEFAULT_PYTHIA_CONFIG))


def build_model(name: str, device: torch.device, scan: str = "auto") -> nn.Module:
    if name == PYTHIA:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        config = GPTNeoXConfig(**json.loads(pythia_config_path().read_text()))
        # float32 weights, as ours: the config says float16 (the released checkpoint's dtype), and
        # transformers builds a model in its config's dtype.
        return GPTNeoXForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32).to(device)
    from bakallm.acceleration import use_scan_backend
    from bakallm.model.config import ModelConfig
    from bakallm.model.network import BakaLM

    model = BakaLM(ModelConfig.preset(name)).to(device)
    return model if device.type == "meta" else use_scan_backend(model, scan)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def build_case(
    name: str,
    batch: int,
    ctx: int,
    device: torch.device,
    dtype: torch.dtype,
    mode: str,
    compile_model: bool,
    scan: str = "auto",
    keep_host_memory: bool = False,
):
    """A callable running one training step (mode "train"; "train-checkpointed" with activation
    checkpointing per block) or one evaluation forward ("eval"). keep_host_memory applies
    bakallm.acceleration.keep_freed_host_memory to this process on a CPU, as `bakallm train` does."""
    if keep_host_memory and device.type == "cpu":
        from bakallm.acceleration import keep_freed_host_memory

        keep_freed_host_memory()
    torch.manual_seed(0)
    model = build_model(name, device, scan)
    if mode == CHECKPOINTED:
        if name == PYTHIA:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            from bakallm.acceleration import checkpoint_layers

            checkpoint_layers(model.layers)
    forward = model
    if compile_model and name == PYTHIA:
        forward = torch.compile(model)
    elif compile_model:
        from bakallm.acceleration import compile_layers

        compile_layers(model)  # the block's graphs serve every layer and window
    ids = torch.randint(0, model.config.vocab_size, (batch, ctx + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def loss_of_batch():
        with autocast(device, dtype):
            if name == PYTHIA:
                return forward(input_ids=inputs, labels=inputs).loss  # shifts the labels itself
            return forward(inputs, targets=targets, return_logits=False).loss

    if mode == "eval":
        model.eval()

        def evaluate():
            with torch.inference_mode():
                loss_of_batch()

        return evaluate
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer's

    def train_step():
        loss_of_batch().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def flops_per_token(name: str, model: nn.Module, ctx: int) -> dict[str, float]:
    """Training model FLOPs per input token and its terms (see the module docstring)."""
    output = model.get_output_embeddings() if name == PYTHIA else model.lm_head
    linear_weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    n_out = output.weight.numel()
    n_layers_params = sum(linear_weights.values()) - n_out
    config = model.config
    if name == PYTHIA:
        n_layers, d_model = config.num_hidden_layers, config.hidden_size
        positions_per_token = 1.0
        pairs = ctx * (ctx + 1) / 2
    else:
        n_layers, d_model = config.n_layers, config.d_model
        positions, pairs = bakallm_layout(config, ctx)
        positions_per_token = positions / ctx
    attended = pairs / ctx
    total = 6 * n_layers_params * positions_per_token + 6 * n_out + 12 * n_layers * d_model * attended
    return {
        "total": total,
        "n_layers_params": n_layers_params,
        "n_out": n_out,
        "positions_per_token": positions_per_token,
        "attended": attended,
    }


def bakallm_layout(config, ctx: int) -> tuple[int, float]:
    """Positions the layers process for `ctx` tokens from a fresh state, and (query, key) pairs
    attended: within each window causally, plus all keys of the previous window when there is one."""
    positions = pairs = 0
    past = 0
    for start in range(0, ctx, config.window):
        tokens = min(config.window, ctx - start)
        pauses = math.ceil(tokens / config.pause_spacing) if config.n_pauses else 0
        length = 2 * config.n_memory + tokens + pauses
        positions += length
        pairs += length * past + length * (length + 1) / 2
        past = length
    return positions, pairs


def peak_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """FLOP/s of the best of a few large square matmuls in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = interleaved_times({"matmul": lambda: a @ b}, 3, device)["matmul"]
    return 2 * size**3 / min(times)


def profile_step(step, device: torch.device, rows: int = 25) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort, row_limit=rows))


def host_synchronisations(step) -> list[str]:
    """The warnings PyTorch gives for each operation of one call of `step` that makes the host wait
    for the GPU (CUDA only): a training step should make none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(warning.message).splitlines()[0] for warning in caught if "synchroniz" in str(warning.message)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser)
    parser.add_argument("--models", nargs="+", default=["tiny", "celp18", PYTHIA])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--ctx", type=int, default=2048, help="tokens per row and step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model, after the warm-up steps")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=2,
        help="untimed steps first: the first step allocates AdamW's state, and on a CPU the step after it still runs "
        "up to 1.5x slower while the heap settles (docs/performance.md)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="on a CPU, fresh processes per model, alternating between models (each: the warm-up and --steps steps)",
    )
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="on a CPU, time every model in this one process instead (interleaved steps; models then share a heap)",
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="autocast dtype")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the models (ours: each layer, the scan staying eager)"
    )
    parser.add_argument("--eval", action="store_true", help="also time evaluation forwards (no gradients)")
    parser.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="also time training steps with activation checkpointing per block",
    )
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak FLOP/s for MFU; 0 measures a large matmul")
    parser.add_argument(
        "--matmul-size", type=int, default=0, help="side of the peak matmul (0: 4096 on CPU, 8192 on CUDA)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument(
        "--no-keep-host-memory",
        dest="keep_host_memory",
        action="store_false",
        help="on a CPU, leave glibc's default of unmapping freed large blocks (bakallm train's --no-keep-host-memory); "
        "by default every model's process keeps them for reuse, as bakallm train does",
    )
    parser.add_argument(
        "--scan",
        default="auto",
        choices=SCAN_BACKENDS,
        help="our models' selective scan backend",
    )
    parser.add_argument(
        "--epoch-tokens",
        type=float,
        default=120e6,
        help="tokens of one epoch, for the projected epoch time (WikiText-103: ~120M)",
    )
    parser.add_argument(
        "--sync-check",
        action="store_true",
        help="on CUDA, count the host synchronisations in one more training step of each model",
    )
    parser.add_argument(
        "--profile", metavar="MODEL", help="print a torch.profiler table of one training step of MODEL and exit"
    )
    args = parser.parse_args()
    device = resolve_device(args)
    dtype = getattr(torch, args.dtype)
    print(f"Machine: {machine_description(device)}")

    models = list(args.models)
    if PYTHIA in models and not pythia_config_path().is_file():
        print(f"Pythia-70m config {pythia_config_path()} is absent (set BAKALLM_PYTHIA_CONFIG): GPT-NeoX left out.")
        models.remove(PYTHIA)
    if args.profile:
        profile_step(
            build_case(
                args.profile,
                args.batch_size,
                args.ctx,
                device,
                dtype,
                "train",
                args.compile,
                args.scan,
                args.keep_host_memory,
            ),
            device,
        )
        return

    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "given"
    else:
        size = args.matmul_size or (8192 if device.type == "cuda" else 4096)
        peak, peak_source = peak_flops(device, dtype, size), f"measured, {size}^3 matmul in {args.dtype}"
    print(f"Peak matmul: {peak / 1e12:.3f} TFLOP/s ({peak_source})")

    modes = ["train"] + ([CHECKPOINTED] if args.activation_checkpointing else []) + (["eval"] if args.eval else [])
    case_arguments = {
        (name, mode): {
            "name": name,
            "batch": args.batch_size,
            "ctx": args.ctx,
            "device": device,
            "dtype": dtype,
            "mode": mode,
            "compile_model": args.compile,
            "scan": args.scan,
            "keep_host_memory": args.keep_host_memory,
        }
        for name in models
        for mode in modes
    }
    peaks = {}
    if device.type == "cpu" and not args.same_process:
        steps = isolated_times("bench_train:build_case", case_arguments, args.steps, args.rounds, args.warmup_steps)
    else:
        cases = {key: build_case(**kwargs) for key, kwargs in case_arguments.items()}
        steps = interleaved_times(cases, args.steps, device, warmup=args.warmup_steps, peaks=peaks)
        if args.sync_check and device.type == "cuda":
            for (name, mode), step in cases.items():
                if mode == "train":
                    found = host_synchronisations(step)
                    print(
                        f"{name}: {len(found)} host synchronisations in one training step{': ' + found[0] if found else ''}"
                    )
        del cases
    times = {key: median(values) for key, values in steps.items()}
    with torch.device("meta"):
        flops = {name: flops_per_token(name, build_model(name, torch.device("meta")), args.ctx) for name in models}

    rows, mfu = [], {}
    tokens = args.batch_size * args.ctx
    for (name, mode), seconds in times.items():
        if device.type == "cpu" and not args.no_memory:
            _, peaks[name, mode] = cpu_peak_memory("bench_train:build_case", case_arguments[name, mode])
        per_token = flops[name]["total"] / (3 if mode == "eval" else 1)
        rate = tokens / seconds
        mfu[name, mode] = per_token * rate / peak
        rows.append(
            [
                name,
                mode,
                f"{args.batch_size}x{args.ctx}",
                f"{flops[name]['positions_per_token']:.3f}",
                f"{flops[name]['n_layers_params'] / 1e6:.1f}M + {flops[name]['n_out'] / 1e6:.1f}M",
                f"{per_token / 1e6:.0f}M",
                f"{seconds:.2f}",
                f"{rate:,.0f}",
                format_bytes(peaks.get((name, mode))),
                f"{mfu[name, mode]:.1%}",
            ]
        )
    print()
    print(
        markdown_table(
            [
                "model",
                "mode",
                "B x T",
                "positions/token",
                "matmul params (layers + output)",
                "FLOPs/token",
                "step s",
                "tokens/s",
                "peak memory",
                "MFU",
            ],
            rows,
        )
    )
    print(
        f"\n{args.dtype}{', compiled' if args.compile else ''}, scan {args.scan}"
        + (f", freed host memory {'kept' if args.keep_host_memory else 'unmapped'}" if device.type == "cpu" else "")
        + "; "
        + (
            f"median of {args.steps * args.rounds} steps, {args.steps} in each of {args.rounds} fresh processes per model (rounds alternating between models), each after {args.warmup_steps} warm-up steps."
            if device.type == "cpu" and not args.same_process
            else f"median of {args.steps} interleaved steps after {args.warmup_steps} warm-up steps."
        )
    )
    for (name, mode), seconds in times.items():
        if mode == "train":
            hours = args.epoch_tokens * seconds / tokens / 3600
            print(
                f"{name}: one epoch of {args.epoch_tokens / 1e6:.0f}M tokens would take {hours:.2f} h ({hours * 60:.1f} min) at this speed."
            )
    for name in models:
        if (name, CHECKPOINTED) in times:
            memory = peaks.get((name, CHECKPOINTED)), peaks.get((name, "train"))
            memory_ratio = f"peak memory {memory[0] / memory[1]:.2f}x, " if None not in memory else ""
            print(
                f"{name} with activation checkpointing: {memory_ratio}step time {times[name, CHECKPOINTED] / times[name, 'train']:.2f}x of without."
            )
    if (PYTHIA, "train") in mfu:
        for name in models:
            if name != PYTHIA and (name, "train") in mfu:
                print(f"{name} / GPT-NeoX training MFU: {mfu[name, 'train'] / mfu[PYTHIA, 'train']:.2f}")


if __name__ == "__main__":
    main()
