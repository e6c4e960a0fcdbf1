"""Does the recurrent state stay healthy over a whole book? Loss by position, whole against reset, and
the size of each part of the state as the document grows.

The documents of --data are read one after another as ONE document (books read in a row) of up to
--tokens tokens, twice: whole (the state carried through) and with the state reset every
--reset-every tokens. Printed:
  - per position bucket (log-spaced): the loss of each reading and the gain of reading whole
    (reset minus whole, in nats per token), with its standard error over the bucket's windows (the
    same windows in both readings, so the difference is paired);
  - every --every tokens: the root-mean-square size of each part of the network's state (RMT memory,
    the XL cache's keys and values, Mamba's conv and SSM states) in the whole reading.
A healthy state keeps the gain from turning negative beyond its noise and every size bounded.

    python benchmarks/state_health.py runs/recall-tiny --data ../shared/data/books/train \
        --tokenizer ../shared/data/tokenizers/gpt-neox-20b/tokenizer.json --tokens 1048576 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

DEFAULT_BUCKETS = (0, 512, 2048, 8192, 32768, 131072, 524288)


def read_document(args: argparse.Namespace, tokenizer):
    """The corpus's documents one after another, cut to --tokens, as a corpus of one document."""
    import numpy as np

    from bakallm.data.corpora import load_corpus
    from bakallm.data.token_cache import TokenizedCorpus, tokenize_corpus

    corpus = tokenize_corpus(load_corpus(args.data), tokenizer, cache_dir=args.cache_dir)
    tokens = np.asarray(corpus.tokens[: min(corpus.n_tokens, args.tokens)], dtype=np.int64)
    return TokenizedCorpus.from_token_lists([tokens], corpus.vocab_size, doc_ids=["books-in-a-row"])


def read(model, document, n_ctx: int, every: int | None, device):
    """Per-window mean losses {window start: (loss sum, tokens)}, and the state's part sizes every `every` tokens."""
    from bakallm.evaluation.evaluate import evaluate_bakallm
    from bakallm.evaluation.settings import EvalSettings

    window_losses: dict[int, tuple[float, int]] = {}
    sizes: list[dict[str, float]] = []

    def on_window(windows, state, token_losses):
        (window,) = windows
        if window is None:
            return
        n = window.stop - window.start
        window_losses[window.start] = (float(token_losses[0, :n].double().sum()), n)
        if every is not None and window.stop // every != window.start // every:
            sizes.append(
                {"position": window.stop, **{name: float(value[0]) for name, value in state.part_sizes().items()}}
            )

    started = time.perf_counter()
    evaluate_bakallm(model, document, EvalSettings(n_ctx=n_ctx, batch_size=1, device=device), on_window=on_window)
    return window_losses, sizes, time.perf_counter() - started


def bucket_gains(whole: dict, reset: dict, buckets: tuple[int, ...]) -> list[dict]:
    rows = []
    stops = (*buckets[1:], math.inf)
    for start, stop in zip(buckets, stops):
        starts = [position for position in whole if start <= position < stop]
        if not starts:
            continue
        tokens = sum(whole[position][1] for position in starts)
        loss_whole = sum(whole[position][0] for position in starts) / tokens
        loss_reset = sum(reset[position][0] for position in starts) / tokens
        gains = [(reset[position][0] - whole[position][0]) / whole[position][1] for position in starts]
        mean = sum(gains) / len(gains)
        spread = (
            math.sqrt(sum((gain - mean) ** 2 for gain in gains) / (len(gains) - 1) / len(gains))
            if len(gains) > 1
            else math.nan
        )
        rows.append(
            {
                "start": start,
                "stop": None if stop == math.inf else stop,
                "tokens": tokens,
                "loss_whole": loss_whole,
                "loss_reset": loss_reset,
                "gain": loss_reset - loss_whole,
                "gain_stderr": spread,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or checkpoint of `bakallm train`")
    parser.add_argument(
        "--data", required=True, help="corpus whose documents are read one after another as one document"
    )
    parser.add_argument("--tokenizer", help="tokenizer (default: the run's)")
    parser.add_argument("--tokens", type=int, default=1 << 20, help="length of the document (default 1048576)")
    parser.add_argument(
        "--reset-every", type=int, default=512, help="reset period of the comparison reading (default 512)"
    )
    parser.add_argument(
        "--every", type=int, default=4096, help="record the state's sizes every N tokens (default 4096)"
    )
    parser.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)), help="position bucket starts")
    parser.add_argument("--threads", type=int, help="CPU threads for PyTorch")
    parser.add_argument("--cache-dir", type=Path, help="token cache folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    import torch

    from bakallm import BakaLM
    from bakallm.data.tokenizers import load_tokenizer
    from bakallm.model.io import model_files

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = BakaLM.from_pretrained(args.run, device)
    tokenizer = load_tokenizer(args.tokenizer or model_files(args.run).tokenizer)
    document = read_document(args, tokenizer)
    buckets = tuple(int(part) for part in args.buckets.split(","))
    whole, sizes, whole_s = read(model, document, 1 << 40, args.every, device)
    reset, _, reset_s = read(model, document, args.reset_every, None, device)
    gains = bucket_gains(whole, reset, buckets)

    print(
        f"{args.run}: {document.n_tokens:,} tokens of {args.data} read as one document "
        f"(whole {whole_s:.0f} s, reset every {args.reset_every}: {reset_s:.0f} s, {torch.get_num_threads()} threads)"
    )
    print("| positions | tokens | loss whole | loss reset | gain (reset - whole) | stderr |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in gains:
        stop = "end" if row["stop"] is None else f"{row['stop']:,}"
        print(
            f"| {row['start']:,}-{stop} | {row['tokens']:,} | {row['loss_whole']:.4f} | {row['loss_reset']:.4f} | {row['gain']:+.4f} | {row['gain_stderr']:.4f} |"
        )
    names = [name for name in ("memory", "keys", "values", "conv", "ssm") if sizes and name in sizes[0]]
    print("\nroot-mean-square size of each part of the state (whole reading)")
    print("| position | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    shown = sizes if len(sizes) <= 40 else [sizes[round(i * (len(sizes) - 1) / 39)] for i in range(40)]
    for entry in shown:
        print(f"| {entry['position']:,} | " + " | ".join(f"{entry[name]:.4f}" for name in names) + " |")
    if sizes:
        print("| max | " + " | ".join(f"{max(entry[name] for entry in sizes):.4f}" for name in names) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({"run": str(args.run), "tokens": document.n_tokens, "gains": gains, "sizes": sizes}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
