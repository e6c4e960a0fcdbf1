"""Evaluation speed and peak memory of our model on one long synthetic document, at several lengths.

Whole-article evaluation streams an article window by window, so neither the memory nor the speed
should depend on the article's length. Target: peak memory at the longest length within 1.2x of
the shortest, and tokens/s no more than 10% lower (a faster long run is load noise, not a failure).

Each length is measured in a fresh process: memory that the allocator kept from a previous length
would otherwise hide any growth. On a CPU, peak memory is the growth of the process's resident
memory during the evaluation, with glibc's mmap threshold fixed
(see `measure_in_fresh_process`); on CUDA, the peak allocated by torch (see `PeakMemory`). On a CPU the
speed is also given per CPU-second of the process, which other processes on a shared machine
barely affect, unlike wall-clock tokens/s.

    python benchmarks/bench_eval.py                                  # tiny: 16K, 131K and 1M tokens
    python benchmarks/bench_eval.py --lengths 16384,131072 --threads 1
    python benchmarks/bench_eval.py --preset celp18 --device cuda
    python benchmarks/bench_eval.py --document-cache-order 3 --text book.txt --tokenizer tokenizer.json

With --document-cache-order K the model carries the document cache of that order, whose n-gram
tables grow with the distinct n-grams read (docs/architecture.md): memory then grows with the
length by design. --text scores a real text (tokenized, repeated to the length) in place of random
tokens, whose n-grams almost never repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

DEFAULT_LENGTHS = (16_384, 131_072, 1_048_576)
MEMORY_TARGET = 1.2  # peak memory at the longest length / at the shortest, at most
SPEED_TARGET = 0.10  # how much lower tokens/s may be at the longest length than at the shortest


@dataclass(frozen=True)
class Measurement:
    tokens: int
    tokens_per_s: float
    tokens_per_cpu_s: float | None  # CPU devices only: on an accelerator the CPU mostly waits
    peak_memory_bytes: int | None


def measure(args: argparse.Namespace, length: int) -> Measurement:
    """Scores one document of `length` tokens (random, or --text repeated) with a freshly initialised model."""
    import numpy as np
    import torch

    from bakallm import BakaLM, ModelConfig
    from bakallm.acceleration import resolve_device
    from bakallm.data.token_cache import TokenizedCorpus
    from bakallm.evaluation.evaluate import evaluate_bakallm
    from bakallm.evaluation.settings import EvalSettings

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    cache = (
        {"document_cache": True, "document_cache_order": args.document_cache_order} if args.document_cache_order else {}
    )
    config = ModelConfig.preset(args.preset, **cache)
    model = BakaLM(config).to(device)
    if args.text:
        from bakallm.data.tokenizers import load_tokenizer

        text_tokens = np.asarray(load_tokenizer(args.tokenizer).encode(open(args.text, encoding="utf-8").read()))
        document = np.resize(text_tokens, length)
    else:
        document = np.random.default_rng(args.seed).integers(0, config.vocab_size, size=length)
    corpus = TokenizedCorpus.from_token_lists([document], config.vocab_size)
    cpu_started = time.process_time()
    # n_ctx = the document's length: the state is carried through the whole document, never reset.
    result = evaluate_bakallm(
        model, corpus, EvalSettings(n_ctx=max(length, config.window), batch_size=args.batch_size, device=device)
    )
    cpu_seconds = time.process_time() - cpu_started
    return Measurement(
        tokens=result.tokens,
        tokens_per_s=result.tokens_per_s,
        tokens_per_cpu_s=result.tokens / cpu_seconds if device.type == "cpu" else None,
        peak_memory_bytes=result.peak_memory_bytes,
    )


def measure_in_fresh_process(args: argparse.Namespace, length: int) -> Measurement:
    command = [
        sys.executable,
        __file__,
        "--measure",
        str(length),
        "--preset",
        args.preset,
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
        "--seed",
        str(args.seed),
    ]
    command += ["--document-cache-order", str(args.document_cache_order)]
    for flag, value in (("--threads", args.threads), ("--text", args.text), ("--tokenizer", args.tokenizer)):
        if value is not None:
            command += [flag, str(value)]
    # glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
    # such blocks stay in its heap: 24-48 MiB of resident memory that grows with the number of
    # windows, not with any tensor we keep (a fixed threshold measured 61 MiB flat from 16K to 131K
    # tokens where the adaptive one gave 112 and 135 MiB). A fixed threshold measures our memory.
    environment = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if finished.returncode != 0:
        sys.exit(f"measuring {length} tokens failed:\n{finished.stderr}")
    return Measurement(**json.loads(finished.stdout.splitlines()[-1]))


def markdown_table(preset: str, measurements: list[Measurement]) -> str:
    first = measurements[0]
    lines = [
        f"| {preset}: document tokens | tokens/s | change | tokens/CPU-s | change | peak memory (MiB) | memory / shortest |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for measurement in measurements:
        lines.append(
            f"| {measurement.tokens + 1:,} | {measurement.tokens_per_s:,.0f} | {_change(measurement.tokens_per_s, first.tokens_per_s)} "
            f"| {_rate(measurement.tokens_per_cpu_s)} | {_change(measurement.tokens_per_cpu_s, first.tokens_per_cpu_s)} "
            f"| {_mib(measurement.peak_memory_bytes)} | {_ratio(measurement.peak_memory_bytes, first.peak_memory_bytes)} |"
        )
    return "\n".join(lines)


def verdict(measurements: list[Measurement]) -> str:
    first, last = measurements[0], measurements[-1]
    lines = [_speed_verdict("tokens/s", last.tokens_per_s / first.tokens_per_s - 1)]
    if first.tokens_per_cpu_s and last.tokens_per_cpu_s is not None:
        lines.append(_speed_verdict("tokens per CPU-second", last.tokens_per_cpu_s / first.tokens_per_cpu_s - 1))
    if first.peak_memory_bytes and last.peak_memory_bytes is not None:
        memory_ratio = last.peak_memory_bytes / first.peak_memory_bytes
        lines.append(
            f"peak memory within {MEMORY_TARGET}x: {'yes' if memory_ratio <= MEMORY_TARGET else 'NO'} ({memory_ratio:.2f}x)"
        )
    return "\n".join(lines)


def _speed_verdict(name: str, change: float) -> str:
    return f"{name} at most {SPEED_TARGET:.0%} lower: {'yes' if change >= -SPEED_TARGET else 'NO'} ({change:+.1%})"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _change(value: float | None, reference: float | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference - 1:+.1%}"


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.1f}"


def _ratio(value: int | None, reference: int | None) -> str:
    return "n/a" if value is None or not reference else f"{value / reference:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset",
        default="tiny",
        choices=("tiny", "celp18"),
        help="model preset (default tiny; celp18 is slow on a CPU)",
    )
    parser.add_argument(
        "--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated document lengths in tokens"
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--document-cache-order", type=int, default=0, help="with the document cache of this order (0: without it)"
    )
    parser.add_argument(
        "--text", help="a text file to score (repeated to each length) instead of random tokens; needs --tokenizer"
    )
    parser.add_argument("--tokenizer", help="tokenizer.json for --text")
    parser.add_argument(
        "--measure", type=int, help=argparse.SUPPRESS
    )  # one length, in this process: how the fresh processes run
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(asdict(measure(args, args.measure))))
        return
    lengths = [int(length) for length in args.lengths.split(",")]
    measurements = []
    for length in lengths:
        measurements.append(measure_in_fresh_process(args, length))
        print(f"measured {length:,} tokens: {measurements[-1].tokens_per_s:,.0f} tokens/s", file=sys.stderr, flush=True)
    label = args.preset + (
        f" + document cache of order {args.document_cache_order}" if args.document_cache_order else ""
    )
    print(markdown_table(label + (f", {args.text}" if args.text else ""), measurements))
    print()
    print(verdict(measurements))


if __name__ == "__main__":
    main()
