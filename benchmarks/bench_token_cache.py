"""Time building the token cache against plain `tokenizers` batch encoding of the same texts.

Corpora: the books in shared/data/books/train (a folder corpus) and WikiText-103 validation; tokenizer:
GPT-NeoX-20B. Usage: python benchmarks/bench_token_cache.py [--data PATH_TO_SHARED_DATA]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import tokenizers

from bakallm.data.corpora import load_corpus
from bakallm.data.token_cache import tokenize_corpus
from bakallm.data.tokenizers import load_tokenizer

DEFAULT_DATA = Path(
    os.environ.get("BAKALLM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args()
    tokenizer_path = args.data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    corpora = [
        load_corpus(str(args.data / "books" / "train")),
        load_corpus(str(args.data / "wikitext-103-raw" / "wiki.valid.raw")),
    ]
    # A first pass puts the files in the page cache, so that no timing below pays for the disk.
    for corpus in corpora:
        for _ in corpus:
            pass

    tokenizer = load_tokenizer(str(tokenizer_path))
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cached_tokens = sum(tokenize_corpus(corpus, tokenizer, Path(cache_dir)).n_tokens for corpus in corpora)
        build_s = time.perf_counter() - start
        build_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        for corpus in corpora:
            tokenize_corpus(corpus, tokenizer, Path(cache_dir))
        reuse_s = time.perf_counter() - start

    texts = [document.text for corpus in corpora for document in corpus]
    plain = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    plain_s = {}
    for method in ("encode_batch", "encode_batch_fast"):
        start = time.perf_counter()
        encodings = getattr(plain, method)(texts, add_special_tokens=False)
        plain_s[method] = time.perf_counter() - start
        plain_tokens = sum(len(encoding.ids) for encoding in encodings)
        if plain_tokens != cached_tokens:
            raise SystemExit(f"token counts differ: cache {cached_tokens}, plain {method} {plain_tokens}")
        del encodings

    n_megabytes = sum(len(text.encode("utf-8")) for text in texts) / 1e6
    print(f"{len(texts)} documents, {n_megabytes:.1f} MB of text, {cached_tokens:,} tokens")
    print(f"token cache build:                  {build_s:7.2f} s  (peak RSS so far {build_peak_mb:.0f} MB)")
    for method, seconds in plain_s.items():
        print(f"plain {method + ':':<30}{seconds:7.2f} s  (cache build / this = {build_s / seconds:.2f})")
    print(f"token cache reuse:                  {reuse_s:7.3f} s")
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other processes slow every figure)")


if __name__ == "__main__":
    main()
