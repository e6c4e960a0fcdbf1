"""Token losses summed per article, and every figure of a result that follows from those sums."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.evaluation.positions import DEFAULT_POSITION_BUCKETS, PositionLoss, check_position_buckets
from bakallm.kernels.cross_entropy import IGNORE_INDEX


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per scored token: total NLL over all articles / tokens scored (NaN ones left out)
    ppl: float  # exp(loss)
    bpb: float | None  # total NLL in bits / UTF-8 bytes of the scored articles; None without text sizes
    word_ppl: float | None  # exp(total NLL / whitespace words of the scored articles); None without text sizes
    legacy_loss: float  # mean over articles of each article's mean token loss, as older scripts reported
    tokens: int  # tokens scored, NaN ones included
    nan_count: int  # scored tokens whose NLL was NaN: counted here, left out of every other figure
    n_articles: int  # articles with at least one scored token
    tokens_per_s: float
    peak_memory_bytes: int | None  # see PeakMemory
    position_losses: tuple[PositionLoss, ...] = ()  # the loss by position in the article, one entry per bucket


class ArticleLossTally:
    """Sums of token losses per article, from which every figure of `EvalResult` follows.

    NaN losses are counted and kept out of the sums, so one broken token is reported instead of
    turning every figure into NaN. With `position_buckets` (the start of each bucket, the first 0),
    the sums are also kept by the position of each token's input in its article.
    """

    def __init__(self, n_articles: int, position_buckets: Sequence[int] = DEFAULT_POSITION_BUCKETS):
        self.nll_sum = np.zeros(n_articles, dtype=np.float64)
        self.n_finite = np.zeros(n_articles, dtype=np.int64)
        self.n_nan = np.zeros(n_articles, dtype=np.int64)
        self.bucket_starts = check_position_buckets(position_buckets)
        self.bucket_nll_sum = np.zeros(len(self.bucket_starts), dtype=np.float64)
        self.bucket_n_finite = np.zeros(len(self.bucket_starts), dtype=np.int64)
        self._bucket_bounds: torch.Tensor | None = None  # the starts after the first, on the device of the losses

    def add(self, articles: Sequence[int], nll: torch.Tensor, scored: torch.Tensor, positions: torch.Tensor) -> int:
        """Adds row r of `nll` [R, T] where `scored` [R, T] holds to article `articles[r]`.

        `positions` [R, T] holds the position in its article of the input of each token.
        Returns the number of tokens added. One transfer to the host per call: sums of one window
        are taken in float32 on the device, and added up across windows in float64 here.
        """
        is_nan = nll.isnan() & scored
        finite = scored & ~is_nan
        finite_nll = torch.where(finite, nll, 0.0)
        per_row = torch.stack((finite_nll.sum(1), finite.sum(1).float(), is_nan.sum(1).float()))
        if self._bucket_bounds is None or self._bucket_bounds.device != nll.device:
            self._bucket_bounds = torch.tensor(self.bucket_starts[1:], dtype=torch.long, device=nll.device)
        bucket = torch.bucketize(positions.to(nll.device).contiguous(), self._bucket_bounds, right=True).flatten()
        per_bucket = torch.zeros(2, len(self.bucket_starts), device=nll.device)
        per_bucket[0].index_add_(0, bucket, finite_nll.flatten().float())
        per_bucket[1].index_add_(0, bucket, finite.flatten().float())
        host = torch.cat((per_row.flatten(), per_bucket.flatten())).cpu().double().numpy()
        sums, n_finite, n_nan = host[: per_row.numel()].reshape(per_row.shape)
        bucket_sums, bucket_counts = host[per_row.numel() :].reshape(per_bucket.shape)
        np.add.at(self.nll_sum, articles, sums)
        np.add.at(self.n_finite, articles, n_finite.astype(np.int64))
        np.add.at(self.n_nan, articles, n_nan.astype(np.int64))
        self.bucket_nll_sum += bucket_sums
        self.bucket_n_finite += bucket_counts.astype(np.int64)
        return int(n_finite.sum() + n_nan.sum())

    def position_losses(self) -> tuple[PositionLoss, ...]:
        stops = (*self.bucket_starts[1:], None)
        return tuple(
            PositionLoss(start, stop, int(count), float(total / count) if count else math.nan)
            for start, stop, total, count in zip(self.bucket_starts, stops, self.bucket_nll_sum, self.bucket_n_finite)
        )

    def result(self, corpus: TokenizedCorpus, seconds: float, peak_memory_bytes: int | None) -> EvalResult:
        scored = (self.n_finite + self.n_nan) > 0
        total_nll = float(self.nll_sum.sum())
        finite_tokens = int(self.n_finite.sum())
        tokens = finite_tokens + int(self.n_nan.sum())
        loss = total_nll / finite_tokens if finite_tokens else math.nan
        with_finite = self.n_finite > 0
        legacy_loss = (
            float(np.mean(self.nll_sum[with_finite] / self.n_finite[with_finite])) if with_finite.any() else math.nan
        )
        n_bytes = int(np.asarray(corpus.n_bytes)[scored].sum())
        n_words = int(np.asarray(corpus.n_words)[scored].sum())
        return EvalResult(
            loss=loss,
            ppl=math.exp(loss) if not math.isnan(loss) else math.nan,
            bpb=total_nll / math.log(2) / n_bytes if n_bytes else None,
            word_ppl=math.exp(total_nll / n_words) if n_words else None,
            legacy_loss=legacy_loss,
            tokens=tokens,
            nan_count=int(self.n_nan.sum()),
            n_articles=int(scored.sum()),
            tokens_per_s=tokens / seconds if seconds > 0 else math.nan,
            peak_memory_bytes=peak_memory_bytes,
            position_losses=self.position_losses(),
        )


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [R, T] of each target under logits [R, T, V]; 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
