"""Token cache: each corpus is tokenized once per tokenizer and stored as memory-mapped arrays.

An entry is a folder `<corpus>--<tokenizer>--<key>` under the cache directory, where the key hashes
the corpus fingerprint and the tokenizer fingerprint. It holds `tokens.bin` (every document's
tokens, back to back), `offsets.npy` (where each document starts, plus the total), `n_bytes.npy`
and `n_words.npy` (size of each document's text) and `meta.json`. An entry is built in a hidden
temporary folder and renamed into place only once complete, so a half-written entry is never read.

A `TokenizedCorpus` is identified by a hash of its content (token ids, document boundaries and
ids, vocabulary size), not of where it was read from: the same files moved elsewhere give the
same fingerprint, so a run can resume on a moved corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bakallm.atomic import reporting_no_room
from bakallm.data.corpora import Corpus, Document
from bakallm.data.tokenizers import Tokenizer
from bakallm.errors import UserError

# Part of every cache key: bump it when the layout or the tokenizing changes.
CACHE_FORMAT = "token-cache-v1"
CACHE_ENV_VAR = "BAKALLM_CACHE"
TOKENS_FILE = "tokens.bin"
OFFSETS_FILE = "offsets.npy"
N_BYTES_FILE = "n_bytes.npy"
N_WORDS_FILE = "n_words.npy"
META_FILE = "meta.json"

# One encode_batch call gets whole documents up to about this much text: enough documents for the
# tokenizer's threads to share, while memory stays bounded by this size (or by the longest document).
BATCH_CHARACTERS = 4_000_000
BATCH_DOCUMENTS = 1024


@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Tokens of every document, back to back, with document boundaries and text sizes.

    Document i is `tokens[offsets[i]:offsets[i + 1]]`. `n_bytes` and `n_words` (UTF-8 bytes and
    whitespace-separated words of each document's text) turn token losses into bits per byte or
    word-level perplexity.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    doc_ids: list[str]
    n_bytes: np.ndarray
    n_words: np.ndarray
    vocab_size: int
    fingerprint: str  # content_fingerprint of the tokens

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @classmethod
    def from_token_lists(
        cls,
        token_lists: Sequence[Sequence[int]],
        vocab_size: int,
        doc_ids: Sequence[str] | None = None,
        texts: Sequence[str] | None = None,
    ) -> TokenizedCorpus:
        """An in-memory corpus; without `texts`, `n_bytes` and `n_words` are zeros."""
        n_documents = len(token_lists)
        doc_ids = [str(index) for index in range(n_documents)] if doc_ids is None else list(doc_ids)
        if len(doc_ids) != n_documents or (texts is not None and len(texts) != n_documents):
            raise ValueError("doc_ids and texts must have one entry per token list")
        offsets = np.zeros(n_documents + 1, dtype=np.int64)
        np.cumsum([len(token_list) for token_list in token_lists], out=offsets[1:])
        # One copy per document, not one Python step per token: corpora of arrays hold millions of them.
        tokens = np.concatenate(
            [np.asarray(token_list, dtype=np.int64).reshape(-1) for token_list in token_lists]
            or [np.zeros(0, dtype=np.int64)]
        )
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        tokens = tokens.astype(token_dtype(vocab_size))
        return cls(
            tokens=tokens,
            offsets=offsets,
            doc_ids=doc_ids,
            n_bytes=_text_sizes(texts, count_bytes, n_documents),
            n_words=_text_sizes(texts, count_words, n_documents),
            vocab_size=vocab_size,
            fingerprint=content_fingerprint(vocab_size, doc_ids, offsets, tokens),
        )


def content_fingerprint(vocab_size: int, doc_ids: Sequence[str], offsets: np.ndarray, tokens: np.ndarray) -> str:
    """A hash of what a tokenized corpus holds, whatever file it was read from."""
    content_hash = hashlib.sha256(f"{vocab_size}\0{json.dumps(list(doc_ids))}".encode())
    content_hash.update(np.ascontiguousarray(offsets, dtype=np.int64).tobytes())
    content_hash.update(np.ascontiguousarray(tokens).tobytes())
    return content_hash.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def default_cache_dir() -> Path:
    """`$BAKALLM_CACHE` when set, else `~/.cache/bakallm/tokens`."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "bakallm" / "tokens"


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: Path | None = None, progress: bool = False
) -> TokenizedCorpus:
    """The tokens of `corpus`, from the cache when an earlier run stored them, else tokenized now and stored."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{corpus.fingerprint()}\0{tokenizer.fingerprint()}".encode()).hexdigest()
    entry = cache_dir / f"{_slug(corpus.name)}--{_slug(tokenizer.name)}--{key[:20]}"
    if entry.is_dir():
        try:
            return _open_entry(entry, key)
        except DamagedEntry as damage:
            # Never used: rebuilt from the corpus, which costs only the time to tokenize it again.
            print(
                f"bakallm: warning: token cache entry {entry} is damaged ({damage}); tokenizing the corpus again.",
                file=sys.stderr,
            )
            shutil.rmtree(entry, ignore_errors=True)
    with reporting_no_room(
        f"write the token cache {entry}",
        "free some space (or pass --cache-dir on another disk) and run the same command again",
    ):
        _build_entry(corpus, tokenizer, key, entry, progress)
    try:
        return _open_entry(entry, key)
    except DamagedEntry as damage:
        raise UserError(
            f"Token cache entry {entry} was damaged as soon as it was written ({damage}); check the disk of --cache-dir."
        ) from None


def _build_entry(corpus: Corpus, tokenizer: Tokenizer, key: str, entry: Path, progress: bool) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=entry.parent))
    try:
        dtype = token_dtype(tokenizer.vocab_size)
        offsets, doc_ids, n_bytes, n_words = [0], [], [], []
        with (
            (partial / TOKENS_FILE).open("wb") as tokens_file,
            tqdm(desc=f"tokenizing {corpus.name}", unit=" docs", disable=None if progress else True) as bar,
        ):
            for batch in _document_batches(corpus):
                encoded = tokenizer.encode_batch([document.text for document in batch])
                for document, ids in zip(batch, encoded, strict=True):
                    tokens_file.write(
                        np.asarray(ids, dtype=dtype).tobytes()
                    )  # a failed write raises OSError with its errno
                    offsets.append(offsets[-1] + len(ids))
                    doc_ids.append(document.id)
                    n_bytes.append(count_bytes(document.text))
                    n_words.append(count_words(document.text))
                bar.update(len(batch))
        if offsets[-1] == 0:
            raise UserError(f"Corpus {corpus.name} has no tokens at all; check that its documents hold text.")
        offsets_array = np.array(offsets, dtype=np.int64)
        np.save(partial / OFFSETS_FILE, offsets_array)
        np.save(partial / N_BYTES_FILE, np.array(n_bytes, dtype=np.int64))
        np.save(partial / N_WORDS_FILE, np.array(n_words, dtype=np.int64))
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "corpus_name": corpus.name,
            "corpus_fingerprint": corpus.fingerprint(),
            "tokenizer_name": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "dtype": dtype.name,
            "n_tokens": offsets[-1],
            "doc_ids": doc_ids,
            "content_fingerprint": content_fingerprint(
                tokenizer.vocab_size,
                doc_ids,
                offsets_array,
                np.memmap(partial / TOKENS_FILE, dtype=dtype, mode="r", shape=(offsets[-1],)),
            ),
        }
        (partial / META_FILE).write_text(json.dumps(meta), encoding="utf-8")
        try:
            os.rename(partial, entry)
        except OSError:
            # Another process completed the same entry first; it holds the same tokens.
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class DamagedEntry(Exception):
    """A token cache entry whose files do not match its metadata: truncated, overwritten or missing."""


def _open_entry(entry: Path, key: str) -> TokenizedCorpus:
    try:
        meta = json.loads((entry / META_FILE).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        tokens_path = entry / TOKENS_FILE
        if meta["key"] != key:
            raise ValueError("its key is another corpus's")
        if tokens_path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
            raise ValueError(
                f"{TOKENS_FILE} holds {tokens_path.stat().st_size:,} bytes instead of {meta['n_tokens'] * dtype.itemsize:,}"
            )
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))
        offsets = np.load(entry / OFFSETS_FILE)
        # A checksum of every token (about a second per 100M tokens): same-size damage is caught too.
        fingerprint = content_fingerprint(meta["vocab_size"], meta["doc_ids"], offsets, tokens)
        if fingerprint != meta.get("content_fingerprint", fingerprint):
            raise ValueError("its tokens do not match their checksum")
        return TokenizedCorpus(
            tokens=tokens,
            offsets=offsets,
            doc_ids=meta["doc_ids"],
            n_bytes=np.load(entry / N_BYTES_FILE),
            n_words=np.load(entry / N_WORDS_FILE),
            vocab_size=meta["vocab_size"],
            fingerprint=fingerprint,
        )
    except (OSError, ValueError, KeyError) as error:
        raise DamagedEntry(str(error)) from None


def _document_batches(corpus: Corpus) -> Iterator[list[Document]]:
    batch: list[Document] = []
    characters = 0
    for document in corpus:
        batch.append(document)
        characters += len(document.text)
        if characters >= BATCH_CHARACTERS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def _text_sizes(texts: Sequence[str] | None, size: Callable[[str], int], n_documents: int) -> np.ndarray:
    if texts is None:
        return np.zeros(n_documents, dtype=np.int64)
    return np.array([size(text) for text in texts], dtype=np.int64)


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def count_words(text: str) -> int:
    return len(text.split())


def _slug(name: str) -> str:
    # Keeps entry folder names readable and safe on every file system.
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[-60:] or "corpus"
