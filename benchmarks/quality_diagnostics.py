"""Diagnostics of the quality study (docs/quality.md): which recurrent paths learn, and which carry information.

gradients: the gradient norm of each parameter group after one training step of carried state, with
  the step spanning one window (train_ctx = window) or two, from a checkpoint or a fresh model.
batching: for each rows x train_ctx shape, the steps one epoch of dynamic batching really takes, the
  share of padding, and the steps with at most half the rows busy, with whole documents and with
  documents split every 32K and 8K tokens.
paths: on a checkpoint, the loss of the tokens after the first window of each document with the full
  carried state, and with one path cut at every window boundary (memory back to the initial
  memory, Mamba state zeroed): how much each path carries across windows.
decay: on a checkpoint (or a fresh model), how much of each Mamba layer's SSM state survives one
  window of text: the share of state entries (channel x state dimension) whose decay over the
  window, exp(A * sum of dt), leaves more than 1%, 10% and 50% of them.
cache: on a checkpoint, how much of the text's repetition the model uses: the loss of the tokens
  after each document's first window, read whole (state carried) and reset at every window, alone
  and mixed with a unigram cache, p = (1 - w) p_model + w p_cache (the best of a few weights w), of
  the document's tokens before the current window, of the window's tokens the model sees, and of
  both. A cache gains what the model leaves unused: before the window, what its state could carry;
  inside, what its attention could copy.
mix: on a checkpoint without the document cache (ours, or an --hf-config run), every document of
  --data scored whole, token by token, as `bakallm bench` scores it, alone and mixed at the best
  constant weight with the cache that ModelConfig.document_cache learns to mix in (the counts of
  the document's tokens so far): what that cache would give a peer, with the weight chosen on the
  very text scored (an upper bound for a constant gate). Ours reads whole or, with --reset, resets
  every window; a transformers model reads windows of --window tokens, each alone. With --order K
  above 1, also the n-gram terms of ModelConfig.document_cache_order K: each context length c < K
  mixed with weight w_c n / (n + kappa), n the count of the context so far (0 if never seen), the
  w_c and kappa the best of a small grid.

    python benchmarks/quality_diagnostics.py gradients RUN_DIR --data books.jsonl --tokenizer tokenizer.json
    python benchmarks/quality_diagnostics.py batching - --data train.jsonl --tokenizer tokenizer.json
    python benchmarks/quality_diagnostics.py paths RUN_DIR --data books.jsonl --tokenizer tokenizer.json --tokens 4096
    python benchmarks/quality_diagnostics.py decay RUN_DIR --data books.jsonl --tokenizer tokenizer.json
    python benchmarks/quality_diagnostics.py cache RUN_DIR --data books.jsonl --tokenizer tokenizer.json --tokens 32768
    python benchmarks/quality_diagnostics.py mix RUN_DIR --data books.jsonl --tokenizer tokenizer.json [--reset] [--order 3]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json

import numpy as np
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.data.batching import IGNORE_INDEX, DocumentBatcher
from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import TokenizedCorpus, tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer
from bakallm.model.state import RecurrentState

GROUPS = ("write_slots", "initial_memory", "pause", "mamba", "attn", "mlp", "embed", "lm_head")


def group_of(name: str) -> str:
    return next((group for group in GROUPS if group in name.split(".")), "other")


def document_rows(args: argparse.Namespace, length: int) -> torch.Tensor:
    """The first `length` + 1 tokens of each document long enough, one row each."""
    corpus = tokenize_corpus(load_corpus(args.data), load_tokenizer(args.tokenizer))
    rows = [
        np.asarray(corpus.document(i)[: length + 1], dtype=np.int64)
        for i in range(len(corpus))
        if len(corpus.document(i)) > length
    ]
    return torch.from_numpy(np.stack(rows[: args.rows]))


def load(args: argparse.Namespace) -> BakaLM:
    if args.run.startswith("{"):  # a fresh model of these ModelConfig fields, for the gradients at initialisation
        torch.manual_seed(0)
        return BakaLM(ModelConfig.preset("celp18", **json.loads(args.run)))
    return BakaLM.from_pretrained(args.run)


def gradients(args: argparse.Namespace) -> None:
    model = load(args)
    window = model.config.window
    tokens = document_rows(args, 3 * window)
    for span in (1, 2):
        model.zero_grad(set_to_none=True)
        # A first window runs without gradient, as the previous step of the trainer did; the step then spans `span` windows.
        with torch.no_grad():
            state = model(tokens[:, :window], return_logits=False).state.detach()
        inputs, targets = tokens[:, window : (1 + span) * window], tokens[:, window + 1 : (1 + span) * window + 1]
        model(inputs, state=state, targets=targets, return_logits=False).loss.backward()
        norms: dict[str, float] = {}
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                norms[group_of(name)] = norms.get(group_of(name), 0.0) + float(parameter.grad.norm()) ** 2
        print(
            f"train_ctx {span * window}: "
            + ", ".join(f"{group} {norms.get(group, 0.0) ** 0.5:.3g}" for group in GROUPS)
        )


def cut(state: RecurrentState, model: BakaLM, path: str) -> RecurrentState:
    if path == "memory":
        fresh = model.initial_memory.detach().float().expand_as(state.memory)
        return dataclasses.replace(state, memory=fresh.clone())
    if path == "mamba":
        return dataclasses.replace(
            state,
            conv=tuple(torch.zeros_like(t) for t in state.conv),
            ssm=tuple(torch.zeros_like(t) for t in state.ssm),
        )
    return state


@torch.inference_mode()
def paths(args: argparse.Namespace) -> None:
    model = load(args).eval()
    window = model.config.window
    tokens = document_rows(args, args.tokens)
    names = ["full", "memory", "mamba"] + (["reset"])
    for path in names:
        state, total, count = None, 0.0, 0
        for start in range(0, args.tokens, window):
            if state is not None and path == "reset":
                state = None
            elif state is not None:
                state = cut(state, model, path)
            output = model(
                tokens[:, start : start + window],
                state=state,
                targets=tokens[:, start + 1 : start + window + 1],
                return_logits=False,
            )
            state = output.state
            if start >= window:  # the first window has no past to cut
                total += float(output.loss) * int(output.n_targets)
                count += int(output.n_targets)
        print(f"{path:>7} cut at every window: loss {total / count:.4f} over {count} tokens after the first window")


@torch.inference_mode()
def decay(args: argparse.Namespace) -> None:
    model = load(args).eval()
    window = model.config.window
    tokens = document_rows(args, 2 * window)
    step_sizes: dict[int, torch.Tensor] = {}  # Mamba layer -> dt summed over the window [rows, d_inner]
    mambas = [layer.mamba for layer in model.layers if layer.mamba is not None]

    def record_step_sizes(index: int):
        def hook(module, inputs, output):
            step_sizes[index] = torch.nn.functional.softplus(output.float()).sum(
                1
            )  # the last window's overwrites the first's

        return hook

    hooks = [mamba.dt_proj.register_forward_hook(record_step_sizes(index)) for index, mamba in enumerate(mambas)]
    state = model(tokens[:, :window], return_logits=False).state
    model(tokens[:, window : 2 * window], state=state, return_logits=False)  # a window with a past, as most are
    for hook in hooks:
        hook.remove()
    for index, mamba in enumerate(mambas):
        survival = torch.exp(
            step_sizes[index].unsqueeze(-1) * -torch.exp(mamba.A_log.float())
        )  # [rows, d_inner, d_state]
        shares = ", ".join(
            f"> {level:.0%}: {float((survival > level).float().mean()):.1%}" for level in (0.01, 0.1, 0.5)
        )
        print(
            f"mamba layer {index}: state entries surviving one window {shares}; median dt {float(step_sizes[index].median()) / window:.4f}"
        )


CACHE_WEIGHTS = (0.02, 0.05, 0.1, 0.2)


def cache_probabilities(tokens: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """The target's share of the document's tokens before the current window ("before") and of the
    window's tokens up to the target's input ("inside"), for every target after the first window."""
    rows, vocab = tokens.shape[0], int(tokens.max()) + 1
    counts = torch.zeros(rows, vocab, dtype=torch.float64)
    before, inside = [], []
    causal = torch.tril(torch.ones(window, window, dtype=torch.bool))
    for start in range(window, tokens.shape[1] - 1, window):
        counts.scatter_add_(1, tokens[:, start - window : start], torch.ones(rows, window, dtype=torch.float64))
        seen, targets = tokens[:, start : start + window], tokens[:, start + 1 : start + window + 1]
        before.append(counts.gather(1, targets) / start)
        matches = (targets.unsqueeze(2) == seen.unsqueeze(1)) & causal[: targets.shape[1], : seen.shape[1]]
        inside.append(matches.sum(2).double() / torch.arange(1, targets.shape[1] + 1))
    return {"before": torch.cat(before, 1), "inside": torch.cat(inside, 1)}


@torch.inference_mode()
def cache(args: argparse.Namespace) -> None:
    model = load(args).eval()
    window = model.config.window
    tokens = document_rows(args, args.tokens)
    caches = cache_probabilities(tokens, window)
    for reading in ("whole", "reset"):
        state, probabilities = None, []
        for start in range(0, args.tokens, window):
            output = model(tokens[:, start : start + window], state=None if reading == "reset" else state)
            state = output.state
            if start >= window:
                targets = tokens[:, start + 1 : start + window + 1]
                probabilities.append(
                    torch.log_softmax(output.logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()
                )
        p_model = torch.cat(probabilities, 1)
        alone = float(-torch.log(p_model).mean())
        line = f"{reading:>5}: model alone {alone:.4f}"
        for name, label in (
            ("before", "cache before the window"),
            ("inside", "cache inside it"),
            ("both", "both caches"),
        ):
            p_cache = (caches["before"] + caches["inside"]) / 2 if name == "both" else caches[name]
            mixes = {
                weight: float(-torch.log((1 - weight) * p_model + weight * p_cache).mean()) for weight in CACHE_WEIGHTS
            }
            best = min(mixes, key=mixes.get)
            line += f"; + {label} {mixes[best]:.4f} ({100 * (mixes[best] / alone - 1):+.2f}%, w {best:g})"
        print(line + f"; over {p_model.numel()} tokens after the first window")


def document_cache_probabilities(tokens: torch.Tensor) -> torch.Tensor:
    """For a document [n], the share of each target tokens[t + 1] among tokens[0..t], t < n - 1."""
    order = torch.sort(tokens, stable=True).indices
    sorted_tokens = tokens[order]
    group_start = torch.ones_like(sorted_tokens, dtype=torch.bool)
    group_start[1:] = sorted_tokens[1:] != sorted_tokens[:-1]
    ranks_sorted = (
        torch.arange(len(tokens)) - torch.cummax(torch.where(group_start, torch.arange(len(tokens)), 0), 0).values
    )
    earlier = torch.empty_like(ranks_sorted).scatter_(0, order, ranks_sorted)  # earlier occurrences of tokens[i]
    return earlier[1:].double() / torch.arange(1, len(tokens), dtype=torch.float64)


def continuation_counts(tokens: list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """For a document and each target tokens[t + 1], t < n - 1: how often the `length` tokens
    ending at t occurred before with their next token read, and how often that next token was
    the target (the counts of ModelConfig.document_cache_order's n-gram terms)."""
    contexts, continuations = collections.Counter(), collections.Counter()
    seen_context, seen_continuation = np.zeros(len(tokens) - 1), np.zeros(len(tokens) - 1)
    for t in range(len(tokens) - 1):
        if t >= length:  # the run ending at t - 1, followed by tokens[t], is now complete
            context = tuple(tokens[t - length : t])
            contexts[context] += 1
            continuations[context + (tokens[t],)] += 1
        if t + 1 >= length:
            context = tuple(tokens[t + 1 - length : t + 1])
            seen_context[t], seen_continuation[t] = contexts[context], continuations[context + (tokens[t + 1],)]
    return seen_context, seen_continuation


MIX_WEIGHTS = (0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
NGRAM_WEIGHTS = (0.1, 0.2, 0.3)
NGRAM_KAPPAS = (1.0, 2.0, 4.0)


@torch.inference_mode()
def mix(args: argparse.Namespace) -> None:
    from bakallm.evaluation.hf_baseline import load_hf_model
    from bakallm.kinds.hf import HF_FOLDER
    from bakallm.training.checkpoint import read_run_config, resolve_checkpoint

    run_dir, checkpoint = resolve_checkpoint(args.run)
    hf = bool(read_run_config(run_dir).get("training", {}).get("hf_config"))
    model = (load_hf_model(checkpoint / HF_FOLDER) if hf else BakaLM.from_pretrained(args.run)).eval()
    window = args.window if hf else model.config.window
    if not hf and model.config.document_cache:
        raise SystemExit("mix: this model already mixes in the document cache; run bakallm bench on it instead.")
    corpus = tokenize_corpus(load_corpus(args.data), load_tokenizer(args.tokenizer))
    p_model, p_cache, ngram_counts = [], [], []
    for index in range(len(corpus)):
        tokens = torch.from_numpy(np.asarray(corpus.document(index), dtype=np.int64))
        state = None
        for start in range(0, len(tokens) - 1, window):
            inputs, targets = tokens[start : start + window], tokens[start + 1 : start + window + 1]
            inputs = inputs[: len(targets)]
            if hf:
                logits = model(input_ids=inputs.unsqueeze(0)).logits[0, :, : model.config.vocab_size]
            else:
                output = model(inputs.unsqueeze(0), state=None if args.reset else state)
                logits, state = output.logits[0], output.state
            p_model.append(torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp())
        p_cache.append(document_cache_probabilities(tokens))
        ngram_counts.append([continuation_counts(tokens.tolist(), length) for length in range(1, args.order)])
    p_model, p_cache = torch.cat(p_model).numpy(), torch.cat(p_cache).numpy()
    ngrams = [
        tuple(np.concatenate([document[c][q] for document in ngram_counts]) for q in (0, 1))
        for c in range(args.order - 1)
    ]
    alone = float(-np.log(p_model).mean())

    def mixed_loss(weight: float, ngram_weights: tuple[float, ...], kappa: float) -> float:
        weights, cache = weight, weight * p_cache
        for w, (n_context, n_continuation) in zip(ngram_weights, ngrams):
            share = w * n_context / (n_context + kappa)
            weights, cache = weights + share, cache + share * n_continuation / np.maximum(n_context, 1)
        return float(-np.log((1 - weights) * p_model + cache).mean())

    grid = [
        (w, ws, k)
        for w in MIX_WEIGHTS
        for ws in itertools.product(NGRAM_WEIGHTS, repeat=args.order - 1)
        for k in NGRAM_KAPPAS
        if w + sum(ws) < 1
    ]
    best = min(grid, key=lambda point: mixed_loss(*point))
    loss = mixed_loss(*best)
    print(
        f"{len(p_model)} tokens of {len(corpus)} documents: model alone {alone:.4f}; with the document cache of order {args.order} {loss:.4f} "
        f"({100 * (loss / alone - 1):+.2f}%, w {best[0]:g}"
        + (f", n-gram w {best[1]}, kappa {best[2]:g})" if args.order > 1 else ")")
    )


def split_documents(corpus: TokenizedCorpus, max_tokens: int) -> TokenizedCorpus:
    pieces = [
        corpus.document(i)[start : start + max_tokens]
        for i in range(len(corpus))
        for start in range(0, len(corpus.document(i)), max_tokens)
    ]
    return TokenizedCorpus.from_token_lists([np.asarray(piece).tolist() for piece in pieces], corpus.vocab_size)


def batching(args: argparse.Namespace) -> None:
    corpus = tokenize_corpus(load_corpus(args.data), load_tokenizer(args.tokenizer))
    lengths = np.diff(np.asarray(corpus.offsets))
    print(f"{len(lengths)} documents, {int(lengths.sum()):,} tokens, longest {int(lengths.max()):,}")
    for label, documents in (
        ("whole", corpus),
        ("split at 32K", split_documents(corpus, 32768)),
        ("split at 8K", split_documents(corpus, 8192)),
    ):
        for rows, train_ctx in ((8, 512), (4, 1024), (2, 2048)):
            steps = targets = half_idle = 0
            for batch in DocumentBatcher(
                documents, rows, train_ctx, mode="dynamic", shuffle=True, seed=0, max_epochs=1
            ):
                steps += 1
                targets += batch.n_targets
                half_idle += int((batch.targets != IGNORE_INDEX).any(1).sum()) <= rows // 2
            filled = int(np.ceil((lengths - 1).sum() / (rows * train_ctx)))
            print(
                f"{label:>12} {rows} x {train_ctx}: {steps} steps (the tokens fill {filled}), padding {1 - targets / (steps * rows * train_ctx):.0%}, "
                f"steps with at most half the rows busy {half_idle} ({half_idle / steps:.0%})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("gradients", "paths", "batching", "decay", "cache", "mix"))
    parser.add_argument(
        "run", help="run directory or checkpoint; or a JSON object of ModelConfig fields for a fresh model"
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="paths, cache: tokens of each document scored")
    parser.add_argument("--reset", action="store_true", help="mix: reset our model's state at every window")
    parser.add_argument("--window", type=int, default=512, help="mix: the window of a transformers model")
    parser.add_argument(
        "--order", type=int, default=1, help="mix: the document cache's order (2 and up add its n-gram terms)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"gradients": gradients, "paths": paths, "batching": batching, "decay": decay, "cache": cache, "mix": mix}[
        args.mode
    ](args)


if __name__ == "__main__":
    main()
