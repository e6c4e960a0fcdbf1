"""The articles of a corpus as every kind of model scores them, and the checks before scoring.

An article of n tokens gives n - 1 (input, target) pairs: the token at position t is the input
that predicts the token at t + 1. Articles of fewer than two tokens have nothing to score.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError


def input_target_pairs(
    corpus: TokenizedCorpus, article: int, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs at positions [start, stop) of an article and the tokens each one predicts."""
    tokens = torch.from_numpy(np.asarray(corpus.document(article)[start : stop + 1], dtype=np.int64))
    return tokens[:-1], tokens[1:]


def scorable_articles(corpus: TokenizedCorpus) -> np.ndarray:
    """Indices of the articles with something to score (two tokens or more), in corpus order."""
    articles = np.flatnonzero(np.diff(np.asarray(corpus.offsets)) >= 2)
    if articles.size == 0:
        raise UserError(
            "No article of the corpus has two or more tokens, so there is nothing to score; use a larger corpus."
        )
    return articles


def article_length(corpus: TokenizedCorpus, article: int) -> int:
    return int(corpus.offsets[article + 1] - corpus.offsets[article])


def scored_token_count(corpus: TokenizedCorpus) -> int:
    """Tokens that an evaluation of `corpus` scores: every token of every article but its first."""
    lengths = np.diff(np.asarray(corpus.offsets))
    return int(np.clip(lengths - 1, 0, None).sum())


def require_vocabulary_fits(
    tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_name: str = "of the corpus"
) -> None:
    if tokenizer_vocab_size > model_vocab_size:
        raise UserError(
            f"The tokenizer {tokenizer_name} has {tokenizer_vocab_size} ids but the model's vocabulary holds only "
            f"{model_vocab_size}; pass the tokenizer the model was trained with (--tokenizer)."
        )


def require_positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}.")


def scoring_progress(corpus: TokenizedCorpus, shown: bool) -> tqdm:
    """The progress bar of scoring `corpus`, counted in scored tokens (silent unless `shown`)."""
    return tqdm(
        total=scored_token_count(corpus),
        unit="tok",
        unit_scale=True,
        desc="scoring",
        disable=None if shown else True,
        dynamic_ncols=True,
    )
