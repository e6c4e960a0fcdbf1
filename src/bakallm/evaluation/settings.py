"""How a corpus is scored, one object for every kind of model and every caller (bench, ablate, train)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bakallm.evaluation.positions import DEFAULT_POSITION_BUCKETS

if TYPE_CHECKING:
    import torch

# Defaults of `bakallm bench` (and of the trainer's evaluation context): our models read whole
# articles of up to a million tokens; a transformer reads windows of 2048 tokens, one per pass.
OUR_N_CTX = 1_048_576
TRANSFORMER_N_CTX = 2048
OUR_BATCH_SIZE = 8
TRANSFORMER_BATCH_SIZE = 1


@dataclass(frozen=True)
class EvalSettings:
    """n_ctx is the context a model may use: our models reset their state every n_ctx tokens (never,
    when it is at least the article's length); a transformer reads windows of n_ctx tokens that
    start every `stride` tokens (default n_ctx / 2). Both score every token once."""

    n_ctx: int
    stride: int | None = None  # transformers only
    batch_size: int = 1  # articles (ours) or windows (a transformer) per forward pass
    device: torch.device | str = "cpu"
    autocast: torch.dtype | None = None  # ours only: the autocast dtype, None for none
    progress: bool = False
    position_buckets: tuple[int, ...] = DEFAULT_POSITION_BUCKETS  # where the loss-by-position buckets start
