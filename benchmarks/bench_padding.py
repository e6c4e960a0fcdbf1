"""Steps and padding share of training epochs under the batcher's policies, on document lengths alone.

    python benchmarks/bench_padding.py [--epochs 1 3] [--max-doc-tokens 0 32768 8192] [--batch-size 8] [--ctx 512]

The corpus is the one of issues 12 and 14: the 60 WikiText-103 validation articles plus six books
of ../shared/data/books/train (or $BAKALLM_SHARED_DATA/books/train), tokenized with the GPT-NeoX tokenizer. Nothing is trained: the
batcher's schedule runs on the document lengths (`DocumentBatcher.count_batches`), so this takes
seconds. "drain every epoch" is the batcher before rows rolled across epochs (each epoch a separate
pass that waits for its slowest row, here shuffled with seeds 0, 1, ...); "rolling" is the current
batcher, which drains only at the end of the run. Documents are shuffled (--shuffle, seed 0).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from bakallm.data.batching import DocumentBatcher
from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import TokenizedCorpus, tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer

SHARED = Path(os.environ.get("BAKALLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
BOOKS = (
    "pride-and-prejudice",
    "a-tale-of-two-cities",
    "life-on-the-mississippi",
    "the-time-machine",
    "the-wonderful-wizard-of-oz",
    "the-red-badge-of-courage",
)


def issue_corpus() -> TokenizedCorpus:
    tokenizer = load_tokenizer(str(SHARED / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"))
    parts = [tokenize_corpus(load_corpus(str(SHARED / "wikitext-103-raw" / "wiki.valid.raw")), tokenizer)]
    for book in BOOKS:
        (path,) = (SHARED / "books" / "train").glob(f"{book}_*.txt")
        parts.append(tokenize_corpus(load_corpus(str(path)), tokenizer))
    documents = [part.document(index).tolist() for part in parts for index in range(len(part))]
    return TokenizedCorpus.from_token_lists(documents, vocab_size=tokenizer.vocab_size)


def steps(corpus: TokenizedCorpus, epochs: int, rolling: bool, max_doc_tokens: int | None, rows: int, ctx: int) -> int:
    if rolling:
        return DocumentBatcher(
            corpus, rows, ctx, shuffle=True, seed=0, max_epochs=epochs, max_doc_tokens=max_doc_tokens
        ).count_batches()
    # Each epoch a pass of its own that drains, with its own shuffle (seeds 0, 1, ...).
    return sum(
        DocumentBatcher(
            corpus, rows, ctx, shuffle=True, seed=seed, max_epochs=1, max_doc_tokens=max_doc_tokens
        ).count_batches()
        for seed in range(epochs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--max-doc-tokens", type=int, nargs="+", default=[0, 65536, 32768, 8192], help="0: whole documents"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    args = parser.parse_args()
    corpus = issue_corpus()
    lengths = np.diff(corpus.offsets)
    targets = int((lengths - 1).clip(min=0).sum())
    print(
        f"{len(lengths)} documents, {corpus.n_tokens:,} tokens, longest {lengths.max():,}; "
        f"{args.batch_size} rows x {args.ctx} tokens: {targets / (args.batch_size * args.ctx):.0f} steps would hold every target once"
    )
    print("| epochs | batcher | --max-doc-tokens | steps | padding |")
    print("|---:|---|---:|---:|---:|")
    for epochs in args.epochs:
        for rolling in (False, True) if epochs > 1 else (True,):
            for max_doc_tokens in args.max_doc_tokens:
                count = steps(corpus, epochs, rolling, max_doc_tokens or None, args.batch_size, args.ctx)
                padding = 1 - epochs * targets / (count * args.batch_size * args.ctx)
                policy = "rolling" if rolling else "drain every epoch"
                print(
                    f"| {epochs} | {policy if epochs > 1 else 'one pass'} | {max_doc_tokens or 'whole documents'} | {count} | {padding:.1%} |"
                )


if __name__ == "__main__":
    main()
