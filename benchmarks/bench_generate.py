"""Decoding and prefill speed of our models against transformers' GPTNeoX of the same shape.

    python benchmarks/bench_generate.py [--models tiny celp18] [--prompt-lengths 512 4096 16384]
                                        [--new-tokens 32] [--device cpu|cuda] [--threads N]

For each preset, a GPTNeoX of the same width, depth, heads and MLP width (random weights,
vocabulary 50304, max_position_embeddings raised to fit) decodes with its KV cache, step by step
as its `generate` does. Both read a random prompt of each length, then write `--new-tokens`
tokens greedily.

- prefill tokens/s: prompt length / time to read the prompt and give the first next-token logits
  (ours: IncrementalReader.read; GPTNeoX: one forward with use_cache).
- decode tokens/s: (new tokens - 1) / the time to write the tokens after the first.
- `--count-ops`: instead of timing, the operator calls per decoded token (the `aten::` counts of
  torch.profiler over `--new-tokens` decoded tokens after a prompt of each length, divided by
  their number): counts do not depend on the machine's load.
  Ours decodes one position per token against a cache of at most two windows, so its speed should
  not depend on the prompt length; GPTNeoX attends to the whole prompt at every token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bakallm import BakaLM, ModelConfig
from bakallm.generation import IncrementalReader
from common import add_device_arguments, machine_description, markdown_table, resolve_device, synchronize

VOCAB = 50277


def gpt_neox_like(config: ModelConfig, max_positions: int):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        intermediate_size=config.d_ff,
        max_position_embeddings=max_positions,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(hf_config)


def time_ours(model: BakaLM, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(seconds to read the prompt, seconds per decoded token after the first)."""
    with torch.inference_mode():
        synchronize(device)
        started = time.perf_counter()
        reader = IncrementalReader(model, batch_size=1, device=device)
        logits = reader.read(prompt)
        token = logits.argmax(-1, keepdim=True)
        synchronize(device)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = reader.read(token).argmax(-1, keepdim=True)
        synchronize(device)
        return prefill, (time.perf_counter() - started) / (new_tokens - 1)


def time_gpt_neox(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """The same two figures for a transformers causal LM, decoding with its KV cache as `generate`
    does (timed step by step, so that the prefill and the decode are measured apart)."""
    with torch.inference_mode():
        synchronize(device)
        started = time.perf_counter()
        output = model(prompt, use_cache=True, logits_to_keep=1)
        token = output.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        prefill = time.perf_counter() - started
        cache = output.past_key_values
        started = time.perf_counter()
        for _ in range(new_tokens - 1):
            output = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = output.past_key_values
            token = output.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        return prefill, (time.perf_counter() - started) / (new_tokens - 1)


def count_ops(decode_one, new_tokens: int) -> float:
    """aten operator calls per call of `decode_one`, over `new_tokens` calls after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    decode_one()
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(new_tokens):
            decode_one()
    return sum(event.count for event in trace.key_averages() if event.key.startswith("aten::")) / new_tokens


def ops_ours(model: BakaLM, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    with torch.inference_mode():
        reader = IncrementalReader(model, batch_size=1, device=device)
        token = reader.read(prompt).argmax(-1, keepdim=True)
        box = [token]

        def one():
            box[0] = reader.read(box[0]).argmax(-1, keepdim=True)

        return count_ops(one, new_tokens)


def ops_gpt_neox(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> float:
    with torch.inference_mode():
        output = model(prompt, use_cache=True, logits_to_keep=1)
        box = [output.logits[:, -1].argmax(-1, keepdim=True), output.past_key_values]

        def one():
            output = model(box[0], past_key_values=box[1], use_cache=True, logits_to_keep=1)
            box[:] = [output.logits[:, -1].argmax(-1, keepdim=True), output.past_key_values]

        return count_ops(one, new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["tiny", "celp18"], help="presets to measure (default tiny celp18)"
    )
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[512, 4096, 16384])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens written per measurement (default 32)")
    parser.add_argument("--skip-peer", action="store_true", help="measure only our models")
    parser.add_argument(
        "--count-ops", action="store_true", help="count operator calls per decoded token instead of timing"
    )
    add_device_arguments(parser)
    args = parser.parse_args()
    device = resolve_device(args)
    torch.manual_seed(0)
    print(f"# Generation speed ({machine_description(device)})\n")
    rows = []
    for preset in args.models:
        config = ModelConfig.preset(preset, vocab_size=VOCAB)
        ours = BakaLM(config).to(device).eval()
        peer = (
            None
            if args.skip_peer
            else gpt_neox_like(config, max(args.prompt_lengths) + args.new_tokens + 8).to(device).eval()
        )
        # One short read and decode of each first: the first call pays one-time costs (the scan
        # backend's self-check and loading its compiled kernel, the allocator's first pages).
        warm_up = torch.randint(0, VOCAB, (1, config.window + 8), device=device)
        time_ours(ours, warm_up, 3, device)
        if peer is not None:
            time_gpt_neox(peer, warm_up, 3, device)
        for length in args.prompt_lengths:
            prompt = torch.randint(0, VOCAB, (1, length), device=device)
            if args.count_ops:
                counts = {"bakallm " + preset: ops_ours(ours, prompt, args.new_tokens, device)}
                if peer is not None:
                    counts["GPTNeoX, same shape"] = ops_gpt_neox(peer, prompt, args.new_tokens, device)
                rows.append([preset, length, *(f"{value:,.0f}" for value in counts.values())])
                if peer is not None:
                    rows[-1].append(f"{counts['bakallm ' + preset] / counts['GPTNeoX, same shape']:.2f}")
                print(
                    markdown_table(
                        ["model", "prompt tokens", "ours: aten calls / token", "GPTNeoX", "ours / GPTNeoX"][
                            : len(rows[-1])
                        ],
                        rows[-1:],
                    ),
                    flush=True,
                )
                continue
            results = {"bakallm " + preset: time_ours(ours, prompt, args.new_tokens, device)}
            if peer is not None:
                results["GPTNeoX, same shape"] = time_gpt_neox(peer, prompt, args.new_tokens, device)
            for name, (prefill, per_token) in results.items():
                rows.append([name, length, f"{length / prefill:,.0f}", f"{1 / per_token:,.1f}"])
            print(
                markdown_table(
                    ["model", "prompt tokens", "prefill tokens/s", "decode tokens/s"], rows[-len(results) :]
                ),
                flush=True,
            )
        del ours, peer
    print("\n## All\n")
    if args.count_ops:
        header = ["model", "prompt tokens", "ours: aten calls / token", "GPTNeoX", "ours / GPTNeoX"]
        print(markdown_table(header[: len(rows[0])] if rows else header, rows))
    else:
        print(markdown_table(["model", "prompt tokens", "prefill tokens/s", "decode tokens/s"], rows))
    print(f"\nload average after: {', '.join(f'{value:.1f}' for value in __import__('os').getloadavg())}")


if __name__ == "__main__":
    main()
