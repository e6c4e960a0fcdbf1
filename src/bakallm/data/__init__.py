"""Data: corpora, tokenizers, the token cache and document batching (see docs/data.md)."""

from __future__ import annotations

from bakallm.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
