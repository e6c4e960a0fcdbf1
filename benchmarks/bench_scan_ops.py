"""Operator calls of one layer-window, forward and backward, per selective-scan backend: on a GPU each
non-view operation is a kernel launch, so the count is what a launch-bound step costs.

    python benchmarks/bench_scan_ops.py [--backends blocked parallel] [--d-model 256] [--rows 2]

The case of issue 24: preset celp18 with d_model 256, 4 heads, 1 layer, d_ff 512, vocabulary 1024,
one thread, `model(x, targets=...)` then `loss.backward()` on 2 x 512 tokens, after one warm-up
step; the count is the sum of the `aten::` counts in torch.profiler's `key_averages()` (views
included), and, beside it, the calls that are not views (an upper bound on kernel launches).
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bakallm import BakaLM, ModelConfig
from bakallm.acceleration import use_scan_backend

VIEWS = {
    "aten::as_strided",
    "aten::select",
    "aten::slice",
    "aten::unsqueeze",
    "aten::view",
    "aten::reshape",
    "aten::permute",
    "aten::transpose",
    "aten::t",
    "aten::expand",
    "aten::squeeze",
    "aten::narrow",
    "aten::unbind",
    "aten::split",
    "aten::chunk",
    "aten::flatten",
    "aten::alias",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::_unsafe_view",
    "aten::view_as",
    "aten::detach",
    "aten::lift_fresh",
}


def count(backend: str | None, args: argparse.Namespace) -> tuple[int, int]:
    torch.manual_seed(0)
    fields = dict(d_model=args.d_model, n_heads=4, n_layers=1, d_ff=2 * args.d_model, vocab_size=1024)
    model = BakaLM(ModelConfig.preset("celp18", **fields, **({} if backend else {"mamba": False})))
    if backend:
        use_scan_backend(model, backend)
    ids = torch.randint(0, 1024, (args.rows, args.tokens + 1))

    def step():
        model(ids[:, :-1], targets=ids[:, 1:], return_logits=False).loss.backward()

    step()
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        step()
    events = [event for event in trace.key_averages() if event.key.startswith("aten::")]
    return sum(event.count for event in events), sum(event.count for event in events if event.key not in VIEWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["blocked", "parallel"])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = {backend: count(backend, args) for backend in args.backends}
    without = count(None, args)
    print(
        f"layer-window (1 layer, {args.rows} x {args.tokens} tokens), forward and backward: aten calls (of which not views)"
    )
    print(f"  without Mamba: {without[0]:,} ({without[1]:,})")
    for backend, (total, compute) in counts.items():
        print(f"  {backend:9}: {total:,} ({compute:,})")
    if "blocked" in counts:
        for backend, (total, compute) in counts.items():
            if backend != "blocked":
                print(
                    f"{backend} / blocked: {total / counts['blocked'][0]:.3f} of the calls, {compute / counts['blocked'][1]:.3f} of those not views"
                )


if __name__ == "__main__":
    main()
