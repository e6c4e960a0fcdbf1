"""Tokenizers: a Hugging Face `tokenizer.json` (local or from the Hub) or a built-in byte-level tokenizer.

`load_tokenizer(spec)` reads, in this order: the literal `bytes`; an existing `tokenizer.json` file
or a folder holding one; the tokenizer shipped with the package (`bakallm-books-8k`, data/embedded.py);
otherwise a Hub model name such as `EleutherAI/pythia-70m-deduped`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tokenizers

from bakallm.data import embedded
from bakallm.data.corpora import hub_revision
from bakallm.errors import UserError

DEFAULT_TOKENIZER = "EleutherAI/pythia-70m-deduped"
BYTES_TOKENIZER = "bytes"
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(ABC):
    """Text to token ids and back; special tokens are never added."""

    name: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids, added tokens included: every id is below it."""

    @abstractmethod
    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text; batching lets fast tokenizers work on several texts at once."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of a sequence of ids (a list or a numpy array)."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable string that changes whenever the text-to-ids mapping could change."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]


@dataclass(frozen=True)
class HuggingFaceTokenizer(Tokenizer):
    name: str
    backend: tokenizers.Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The "fast" variant skips computing character offsets, which we never use.
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=False)

    def fingerprint(self) -> str:
        # The canonical serialisation, so that equal tokenizers from a file and from the Hub
        # (whose JSON may differ in formatting or defaults) share token caches.
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ByteTokenizer(Tokenizer):
    """Ids 0..255 are the UTF-8 bytes of the text; needs no file."""

    name: str = BYTES_TOKENIZER

    @property
    def vocab_size(self) -> int:
        return 256

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # A window of ids may cut a multi-byte character: show it as U+FFFD rather than fail.
        # (map(int) also keeps bytes() from reading a numpy array's raw buffer.)
        return bytes(map(int, ids)).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"


def load_tokenizer(spec: str = DEFAULT_TOKENIZER) -> Tokenizer:
    if spec == BYTES_TOKENIZER:
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise UserError(f"Folder {spec} holds no {TOKENIZER_FILE}; pass a folder or file that has one.")
    if path.is_file():
        return _load_tokenizer_file(path.resolve(), name=str(path.resolve()))
    if embedded.tokenizer_file(spec) is not None:
        return _load_tokenizer_file(embedded.tokenizer_file(spec), name=spec)
    if _looks_like_hub_name(spec):
        return _load_hub_tokenizer(spec)
    raise UserError(
        f"No tokenizer file at {spec}; pass a tokenizer.json path, a Hub model name, {embedded.TOKENIZER} or `bytes`."
    )


def _looks_like_hub_name(spec: str) -> bool:
    owner, _, repo = spec.partition("/")
    return bool(owner and repo) and "/" not in repo and not spec.startswith(".") and not spec.endswith(".json")


def _load_tokenizer_file(path: Path, name: str) -> HuggingFaceTokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust parser raises plain Exceptions
        raise UserError(
            f"{path} is not a valid Hugging Face tokenizer.json file; check that it is not damaged."
        ) from error
    return HuggingFaceTokenizer(name=name, backend=backend)


def _load_hub_tokenizer(repo_id: str) -> HuggingFaceTokenizer:
    from huggingface_hub import try_to_load_from_cache

    advice = "pass the path of a local tokenizer.json instead"
    try:
        revision = hub_revision(repo_id, "model", advice)
    except UserError:
        # Offline, a tokenizer that an earlier run downloaded is as good as a fresh one.
        cached = try_to_load_from_cache(repo_id, TOKENIZER_FILE)
        if not isinstance(cached, str):
            raise
        return _load_tokenizer_file(Path(cached), name=repo_id)
    try:
        backend = tokenizers.Tokenizer.from_pretrained(repo_id, revision=revision)
    except Exception as error:  # download and parse failures both surface as plain Exceptions
        raise UserError(f"Could not load a tokenizer from {repo_id} on the Hugging Face Hub; {advice}.") from error
    return HuggingFaceTokenizer(name=repo_id, backend=backend)
