"""Data: corpora, tokenizers, the token cache and document batching (see docs/data.md)."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that reading corpora or building a token cache does not pay for torch.
_LAZY_EXPORTS = {
    "Document": "bakallm.data.corpora",
    "Corpus": "bakallm.data.corpora",
    "load_corpus": "bakallm.data.corpora",
    "Tokenizer": "bakallm.data.tokenizers",
    "DEFAULT_TOKENIZER": "bakallm.data.tokenizers",
    "load_tokenizer": "bakallm.data.tokenizers",
    "TokenizedCorpus": "bakallm.data.token_cache",
    "tokenize_corpus": "bakallm.data.token_cache",
    "Batch": "bakallm.data.batching",
    "DocumentBatcher": "bakallm.data.batching",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'bakallm.data' has no attribute {name!r}")
