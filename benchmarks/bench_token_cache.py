"""Time building the token cache against plain `tokenizers` batch encoding of the same texts.

Corpora: the books in shared/data/books/train (a folder corpus) and WikiText-103 validation; tokenizer:
GPT-NeoX-20B. Each measurement is repeated and the fastest run is kept, since other processes on
the machine slow single runs down unevenly. The build time is also split into the time spent inside
the tokenizer and the rest (reading, bookkeeping, writing), which is the cache's own overhead.

Usage: python benchmarks/bench_token_cache.py [--data PATH_TO_SHARED_DATA] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import tokenize_corpus
from bakallm.data.tokenizers import Tokenizer, load_tokenizer

DEFAULT_DATA = Path(
    os.environ.get("BAKALLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


@dataclass
class StopwatchTokenizer(Tokenizer):
    """Adds up the time spent encoding by the tokenizer it wraps."""

    inner: Tokenizer
    encode_s: float = 0.0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        start = time.perf_counter()
        ids = self.inner.encode_batch(texts)
        self.encode_s += time.perf_counter() - start
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(ids)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the fastest is kept")
    args = parser.parse_args()
    tokenizer_path = args.data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    corpora = [
        load_corpus(str(args.data / "books" / "train")),
        load_corpus(str(args.data / "wikitext-103-raw" / "wiki.valid.raw")),
    ]
    texts = [document.text for corpus in corpora for document in corpus]  # also warms the page cache
    plain = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    tokenizer = load_tokenizer(str(tokenizer_path))

    builds, plain_s = [], {"encode_batch": [], "encode_batch_fast": []}
    build_peak_mb = 0.0  # measured after the first build, before plain encoding holds every encoding at once
    for _ in range(args.repeats):
        stopwatch = StopwatchTokenizer(tokenizer)
        with tempfile.TemporaryDirectory() as cache_dir:
            start = time.perf_counter()
            n_tokens = sum(tokenize_corpus(corpus, stopwatch, Path(cache_dir)).n_tokens for corpus in corpora)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            for corpus in corpora:
                tokenize_corpus(corpus, stopwatch, Path(cache_dir))
            builds.append((build_s, stopwatch.encode_s, time.perf_counter() - start))
        build_peak_mb = build_peak_mb or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        for method, times in plain_s.items():
            start = time.perf_counter()
            plain_tokens = sum(
                len(encoding.ids) for encoding in getattr(plain, method)(texts, add_special_tokens=False)
            )
            times.append(time.perf_counter() - start)
            if plain_tokens != n_tokens:
                raise SystemExit(f"token counts differ: cache {n_tokens}, plain {method} {plain_tokens}")

    build_s, encode_s, reuse_s = min(builds)
    n_megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    print(f"{len(texts)} documents, {n_megabytes:.1f} MB of text, {n_tokens:,} tokens; best of {args.repeats} runs")
    print(f"token cache build:                 {build_s:7.2f} s")
    print(f"  inside Tokenizer.encode_batch:   {encode_s:7.2f} s")
    print(f"  cache overhead (read, write...): {build_s - encode_s:7.2f} s")
    for method, times in plain_s.items():
        print(f"plain tokenizers {method + ':':<18}{min(times):7.2f} s  (build / plain = {build_s / min(times):.2f})")
    print(f"token cache reuse:                 {reuse_s:7.3f} s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {build_peak_mb:.0f} MB during the cache build, {peak_mb:.0f} MB during plain encoding")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
