"""Where does a fact live in the state, and how far does the gradient reach? Diagnostics of recall.

    python benchmarks/recall_diagnostics.py trace RUN --data FILLER [--windows 64] [--samples 8]
    python benchmarks/recall_diagnostics.py paths RUN --data FILLER [--distances 0.5,1,2,4,8] [--samples 50]
    python benchmarks/recall_diagnostics.py reach RUN --data FILLER [--distances 0.5,1,2,4,8]
    python benchmarks/recall_diagnostics.py mamba RUN --data FILLER

trace: two copies of each recall sample that differ only in the fact's code are read side by side;
  after every window, the root-mean-square difference of each part of the state (RMT memory, XL keys
  and values, Mamba conv and SSM), relative to that part's own size, says how much of the fact that
  part still holds N windows after it was read, whatever the model later does with it.
paths: recall of the trained model with each path of the state switched off while it reads (the
  memory not carried, the Mamba state not carried, no XL cache), weights unchanged: which path
  carries the fact, and how far.
reach: the gradient of the answer's loss with respect to the fact's token embeddings, relative to
  that with respect to the query's, as the distance grows: how far back training can teach the
  model to store (within one backpropagation span).
mamba: each Mamba layer's step sizes at the fact's code tokens against at filler tokens (is the
  write selective?), and the share of SSM state components that keep a tenth of themselves across
  1, 8 and 64 windows of filler (does the state hold?).
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import torch

from bakallm import BakaLM
from bakallm.data.corpora import load_corpus
from bakallm.data.recall import FactWriter, RecallSample, filler_stream, recall_samples
from bakallm.data.token_cache import tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.model.io import model_files

PARTS = ("memory", "keys", "values", "conv", "ssm")


def load(args):
    model = BakaLM.from_pretrained(args.run).eval()
    tokenizer = load_tokenizer(args.tokenizer or model_files(args.run).tokenizer)
    filler = filler_stream(tokenize_corpus(load_corpus(args.data), tokenizer))
    return model, FactWriter(tokenizer), filler


def code_span(sample: RecallSample) -> tuple[int, int]:
    """Where the queried fact's code lies in the sample (tokenized as its answer is)."""
    return sample.code_start, sample.code_start + len(sample.answer)


def differing_pair(sample: RecallSample, writer: FactWriter, rng) -> torch.Tensor:
    """[2, T] inputs: the sample and the same with other code tokens (digits drawn again)."""
    start, stop = code_span(sample)
    other = sample.tokens.copy()
    digits = writer.tokenizer.encode_batch([" " + " ".join(str(d) for d in rng.integers(0, 10, size=stop - start))])[0]
    if len(digits) != stop - start:
        raise ValueError("codes of this tokenizer do not have one token per digit; use a subword tokenizer")
    other[start:stop] = digits
    return torch.from_numpy(np.stack([sample.tokens, other]))


def fact_traces(
    model: BakaLM, samples: list[RecallSample], writer: FactWriter, windows: int, seed: int = 0
) -> np.ndarray:
    """[windows + 1, parts]: the mean over samples of each state part's RMS difference between the
    sample and a copy with another code, relative to the part's size, 0 .. `windows` windows after
    the window in which the code ends. Each sample needs `windows` windows of filler after its fact."""
    window = model.config.window
    rng = np.random.default_rng(seed)
    totals = np.zeros((windows + 1, len(PARTS)))
    with torch.inference_mode():
        for sample in samples:
            pair = differing_pair(sample, writer, rng)
            fact_window = code_span(sample)[1] // window
            state = model.init_state(2)
            for index in range(fact_window + windows + 1):
                state = model(pair[:, index * window : (index + 1) * window], state=state, return_logits=False).state
                after = index - fact_window
                if after < 0:
                    continue
                for part, name in enumerate(PARTS):
                    tensors = getattr(state, name)
                    tensors = tensors if isinstance(tensors, tuple) else (tensors,)
                    difference = sum(float((t[0] - t[1]).float().square().sum()) for t in tensors)
                    size = sum(float(t.float().square().sum()) / 2 for t in tensors)
                    totals[after, part] += math.sqrt(difference / size) if size > 0 else 0.0
    return totals / len(samples)


def trace(args) -> None:
    model, writer, filler = load(args)
    window = model.config.window
    samples = recall_samples(filler, writer, (args.windows + 1) * window, args.samples, seed=args.seed, depth_tokens=0)
    totals = fact_traces(model, samples, writer, args.windows, args.seed)
    print(
        f"{args.run}: how much of a fact each part of the state holds N windows after it (RMS difference between two readings "
        f"that differ only in the code, relative to the part's size; {len(samples)} samples, window {window})"
    )
    print("| windows after | " + " | ".join(PARTS) + " |")
    print("|---:|" + "---:|" * len(PARTS))
    for after in sorted({0, 1, 2, 3, 4, 8, 16, 32, 64, args.windows} & set(range(args.windows + 1))):
        print(f"| {after} | " + " | ".join(f"{value:.2e}" for value in totals[after]) + " |")


# Each path of the state switched off at reading time, with the weights unchanged.
PATH_SWITCHES = {
    "whole state": {},
    "no memory carry": {"carry_memory": False},
    "no Mamba carry": {"carry_mamba_state": False},
    "no XL cache": {"xl_cache": False},
    "Mamba only": {"carry_memory": False, "xl_cache": False},
    "memory only": {"carry_mamba_state": False, "xl_cache": False},
}


def with_switches(model: BakaLM, changes: dict) -> BakaLM:
    """The same weights in a model whose config has `changes` (switches that add or drop no weight)."""
    variant = BakaLM(model.config.replace(**changes)).eval()
    variant.load_state_dict(model.state_dict())
    return variant


def paths(args) -> None:
    from bakallm.evaluation.recall import RecallSettings, RecallTest, bakallm_answer_log_probs

    model = BakaLM.from_pretrained(args.run).eval()
    tokenizer = load_tokenizer(args.tokenizer or model_files(args.run).tokenizer)
    distances = tuple(float(part) for part in args.distances.split(","))
    test = RecallTest.draw(
        RecallSettings(distances=distances, samples=args.samples, seed=args.seed),
        tokenize_corpus(load_corpus(args.data), tokenizer),
        tokenizer,
        model.config.window,
    )
    print(
        f"{args.run}: exact answers (first token) with one path of the state switched off while reading, same weights; "
        f"{args.samples} samples per distance, window {model.config.window}"
    )
    print("| state | " + " | ".join(f"{distance:g} w" for distance in distances) + " |")
    print("|---|" + "---:|" * len(distances))
    for name, changes in PATH_SWITCHES.items():
        variant = with_switches(model, changes)

        def answer_log_probs(samples, n_ctx, batch_size, keep_document_cache, variant=variant):
            return bakallm_answer_log_probs(
                variant, samples, batch_size, torch.device("cpu"), n_ctx, keep_document_cache
            )

        scores = test.score(answer_log_probs, n_ctx=1 << 40, batch_size=8)
        print(
            f"| {name} | "
            + " | ".join(f"{score.accuracy:.0%} ({score.first_token_accuracy:.0%})" for score in scores)
            + " |",
            flush=True,
        )


def reach(args) -> None:
    model, writer, filler = load(args)
    window = model.config.window
    print(
        f"{args.run}: gradient of the answer loss at the fact's code / at the query's tokens (embeddings), one call, no truncation"
    )
    print("| distance (windows) | tokens | gradient ratio (median) |")
    print("|---:|---:|---:|")
    for distance in (float(part) for part in args.distances.split(",")):
        ratios = []
        for sample in recall_samples(
            filler, writer, round(distance * window), args.samples, seed=args.seed, max_depth_tokens=window
        ):
            start, stop = code_span(sample)
            inputs = torch.from_numpy(sample.tokens[None, :-1])
            targets = torch.full_like(inputs, -100)
            targets[0, sample.answer_start - 1 :] = torch.from_numpy(sample.answer)
            model.zero_grad(set_to_none=True)
            embedded = []  # one per window: the embedding is called window by window

            def keep_embedding_gradient(module, inputs_, output):
                output.retain_grad()
                embedded.append(output)

            handle = model.embed.register_forward_hook(keep_embedding_gradient)
            try:
                model(inputs, targets=targets, return_logits=False).loss.backward()
            finally:
                handle.remove()
            gradient = torch.cat([piece.grad[0] for piece in embedded]).norm(dim=-1)
            query = gradient[sample.answer_start - 8 : sample.answer_start].mean()
            ratios.append(float(gradient[start:stop].mean() / query))
        print(f"| {distance:g} | {round(distance * window):,} | {np.median(ratios):.2e} |")


def mamba(args) -> None:
    model, writer, filler = load(args)
    window = model.config.window
    samples = recall_samples(filler, writer, window, args.samples, seed=args.seed, max_depth_tokens=window)
    step_sizes: dict[int, list[torch.Tensor]] = {}

    def recorder(index):
        def record(module, inputs, output):
            step_sizes.setdefault(index, []).append(output.detach())

        return record

    handles = [
        layer.mamba.dt_proj.register_forward_hook(recorder(index))
        for index, layer in enumerate(model.layers)
        if layer.mamba is not None
    ]
    per_layer: dict[int, list[tuple[torch.Tensor, int, int]]] = {}
    try:
        with torch.inference_mode():
            for sample in samples:
                step_sizes.clear()
                model(torch.from_numpy(sample.tokens[None, :-1]), return_logits=False)
                for index, calls in step_sizes.items():
                    per_layer.setdefault(index, []).append(
                        (torch.cat([_tokens_of_body(call[0], model.config) for call in calls]), *code_span(sample))
                    )
    finally:
        for handle in handles:
            handle.remove()
    print(
        f"{args.run}: Mamba step sizes dt at the fact's code tokens and at filler tokens, and the retention of the SSM state over filler"
    )
    print(
        "| layer | mean dt, code | mean dt, filler | components keeping 1/10 over 1 window | 8 windows | 64 windows |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for index, layer in enumerate(model.layers):
        if layer.mamba is None:
            continue
        A = -torch.exp(layer.mamba.A_log.float())  # [d_inner, d_state]
        code, rest = [], []
        for outputs, start, stop in per_layer[index]:
            dt = torch.nn.functional.softplus(outputs.float())  # [T, d_inner]
            code.append(dt[start:stop])
            rest.append(torch.cat((dt[:start], dt[stop:])))
        code, rest = torch.cat(code), torch.cat(rest)
        mean_filler_dt = rest.mean(0)  # [d_inner]
        keep = [float((torch.exp(mean_filler_dt[:, None] * A * window * n) >= 0.1).float().mean()) for n in (1, 8, 64)]
        print(f"| {index} | {code.mean():.2e} | {rest.mean():.2e} | {keep[0]:.1%} | {keep[1]:.1%} | {keep[2]:.1%} |")


def _tokens_of_body(window: torch.Tensor, config) -> torch.Tensor:
    """The rows of a window's layout [L, ...] at its tokens: read and write slots and pauses dropped."""
    body = window[config.n_memory : window.shape[0] - config.n_memory]
    if config.n_pauses == 0:
        return body
    step = config.pause_step
    keep = [
        position
        for position in range(body.shape[0])
        if not (position % (step + 1) == 0 and position // (step + 1) < config.n_pauses)
    ]
    return body[keep]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    for name, function in (("trace", trace), ("paths", paths), ("reach", reach), ("mamba", mamba)):
        sub = modes.add_parser(name)
        sub.add_argument("run")
        sub.add_argument("--data", required=True, help="filler corpus")
        sub.add_argument("--tokenizer", help="default: the run's")
        sub.add_argument("--samples", type=int, default=8)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--threads", type=int, default=1)
        sub.set_defaults(function=function)
        if name == "trace":
            sub.add_argument("--windows", type=int, default=64, help="windows of filler after the fact")
        if name in ("reach", "paths"):
            sub.add_argument("--distances", default="0.5,1,2,4,8", help="in windows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.function(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
