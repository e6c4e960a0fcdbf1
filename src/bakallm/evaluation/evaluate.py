"""Whole-article evaluation of our recurrent models, and the figures shared with Hugging Face baselines.

Every kind of model scores the same tokens of each tokenized article: all of them but the first, each
exactly once, predicted from earlier tokens of the same article. An article of n tokens gives n - 1
(input, target) pairs: the token at position t is the input that predicts the token at t + 1.
Articles of fewer than two tokens have nothing to score and are left out of every figure.
See docs/benchmark.md for the definitions and the choices.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError
from bakallm.evaluation.positions import DEFAULT_POSITION_BUCKETS, PositionLoss, check_position_buckets
from bakallm.evaluation.settings import EvalSettings
from bakallm.model.network import IGNORE_INDEX, BakaLM
from bakallm.model.state import RecurrentState

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
# Writing this to /proc/self/clear_refs resets the process's resident-memory high-water mark (VmHWM).
_RESET_PEAK_RSS = "5"


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
        legacy_loss = float(np.mean(self.nll_sum[with_finite] / self.n_finite[with_finite])) if with_finite.any() else math.nan
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


class PeakMemory:
    """Peak memory of the work done between construction and `peak_bytes()`.

    On CUDA: the most memory torch held allocated on the device (weights included). On a Linux CPU:
    how far the process's resident memory rose above its size at construction, read from the
    kernel's high-water mark (VmHWM) after resetting it, so no sampling thread is needed and the
    weights loaded beforehand do not count. Elsewhere: None.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._resident_at_start: int | None = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif device.type == "cpu":
            self._resident_at_start = _reset_resident_peak()

    def peak_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self._resident_at_start is None:
            return None
        return max(_proc_status_bytes("VmHWM") - self._resident_at_start, 0)


def _reset_resident_peak() -> int | None:
    """Resets VmHWM and returns the resident size now, or None where /proc does not allow it."""
    try:
        _PROC_CLEAR_REFS.write_text(_RESET_PEAK_RSS)
        return _proc_status_bytes("VmRSS")
    except (OSError, ValueError):
        return None


def _proc_status_bytes(field: str) -> int:
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise ValueError(f"{_PROC_STATUS} has no {field} line")


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood [R, T] of each target under logits [R, T, V]; 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)


def input_target_pairs(corpus: TokenizedCorpus, article: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs at positions [start, stop) of an article and the tokens each one predicts."""
    tokens = torch.from_numpy(np.asarray(corpus.document(article)[start : stop + 1], dtype=np.int64))
    return tokens[:-1], tokens[1:]


def scorable_articles(corpus: TokenizedCorpus) -> np.ndarray:
    """Indices of the articles with something to score (two tokens or more), in corpus order."""
    articles = np.flatnonzero(np.diff(np.asarray(corpus.offsets)) >= 2)
    if articles.size == 0:
        raise UserError("No article of the corpus has two or more tokens, so there is nothing to score; use a larger corpus.")
    return articles


def article_length(corpus: TokenizedCorpus, article: int) -> int:
    return int(corpus.offsets[article + 1] - corpus.offsets[article])


def scored_token_count(corpus: TokenizedCorpus) -> int:
    """Tokens that an evaluation of `corpus` scores: every token of every article but its first."""
    lengths = np.diff(np.asarray(corpus.offsets))
    return int(np.clip(lengths - 1, 0, None).sum())


def require_vocabulary_fits(tokenizer_vocab_size: int, model_vocab_size: int, tokenizer_name: str = "of the corpus") -> None:
    if tokenizer_vocab_size > model_vocab_size:
        raise UserError(
            f"The tokenizer {tokenizer_name} has {tokenizer_vocab_size} ids but the model's vocabulary holds only "
            f"{model_vocab_size}; pass the tokenizer the model was trained with (--tokenizer)."
        )


def require_positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be at least 1, got {value}.")


# ----- our recurrent models -----


@dataclass(frozen=True)
class ArticleWindow:
    """One model call's worth of one article: inputs at positions [start, stop) predict [start + 1, stop + 1)."""

    article: int
    start: int
    stop: int
    reset: bool  # the state starts fresh here: the article or one of its n_ctx segments begins


# Called after each model call of an evaluation with the windows of that call, the state after them
# and the token losses [B, window] (0 where nothing is scored).
WindowHook = Callable[[list["ArticleWindow | None"], RecurrentState, torch.Tensor], None]


def bakallm_windows(article: int, n_tokens: int, n_ctx: int, window: int) -> Iterator[ArticleWindow]:
    """The windows of an article: its inputs cut into segments of n_ctx, each cut into windows of `window`.

    A segment whose length is not a multiple of the window ends with a shorter window, so the state
    is reset after exactly n_ctx tokens rather than at a rounded position.
    """
    n_inputs = n_tokens - 1
    for segment_start in range(0, n_inputs, n_ctx):
        segment_stop = min(segment_start + n_ctx, n_inputs)
        for start in range(segment_start, segment_stop, window):
            yield ArticleWindow(article, start, min(start + window, segment_stop), reset=start == segment_start)


class _RowFeeder:
    """Hands each batch row its next window, moving a row on to the next article when its own ends."""

    def __init__(self, corpus: TokenizedCorpus, n_ctx: int, window: int, batch_size: int):
        articles = scorable_articles(corpus).tolist()
        self._corpus = corpus
        self._articles = iter(articles)
        self._n_ctx, self._window = n_ctx, window
        self._row_windows: list[Iterator[ArticleWindow]] = [iter(()) for _ in range(min(batch_size, len(articles)))]

    @property
    def n_rows(self) -> int:
        return len(self._row_windows)

    def next_windows(self) -> list[ArticleWindow | None]:
        """The next window of each row; None for a row with no article left."""
        return [self._next_window(row) for row in range(self.n_rows)]

    def _next_window(self, row: int) -> ArticleWindow | None:
        while True:
            window = next(self._row_windows[row], None)
            if window is not None:
                return window
            article = next(self._articles, None)
            if article is None:
                return None
            self._row_windows[row] = bakallm_windows(article, article_length(self._corpus, article), self._n_ctx, self._window)


def evaluate_bakallm(model: BakaLM, corpus: TokenizedCorpus, settings: EvalSettings, on_window: WindowHook | None = None) -> EvalResult:
    """Scores every article of `corpus` with `model` (already on `settings.device`), reading each from its start.

    The state is carried through an article and reset every n_ctx tokens (never, when n_ctx is at
    least the article's length). Several articles run side by side as batch rows, each row taking
    the next article when its own ends; a row with no article left runs padding. Each model call
    processes one window per row, so memory does not grow with the length of an article.
    """
    memory = PeakMemory(torch.device(settings.device))
    started = time.perf_counter()
    tally = score_articles(model, corpus, settings, on_window)
    return tally.result(corpus, time.perf_counter() - started, memory.peak_bytes())


def score_articles(model: BakaLM, corpus: TokenizedCorpus, settings: EvalSettings, on_window: WindowHook | None = None) -> ArticleLossTally:
    """The token losses of every article, as `evaluate_bakallm` reads them, summed per article.

    `on_window`, when given, sees each call's windows (None for an idle row), the state after them and their token losses.
    """
    window, n_ctx, autocast = model.config.window, settings.n_ctx, settings.autocast
    if n_ctx < window:
        raise UserError(f"n_ctx {n_ctx} is smaller than the model's window of {window} tokens; pass an n_ctx of at least {window}.")
    require_positive("The batch size", settings.batch_size)
    require_vocabulary_fits(corpus.vocab_size, model.config.vocab_size)
    device = torch.device(settings.device)
    feeder = _RowFeeder(corpus, n_ctx, window, settings.batch_size)
    tally = ArticleLossTally(len(corpus), settings.position_buckets)
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), precision, tqdm(
            total=scored_token_count(corpus), unit="tok", unit_scale=True, desc="scoring", disable=None if settings.progress else True, dynamic_ncols=True
        ) as bar:
            state = model.init_state(feeder.n_rows, device)
            windows = feeder.next_windows()
            while any(windows):
                input_ids, targets, reset = _window_batch(corpus, windows, window)
                targets = targets.to(device)
                # The targets' losses only: with the document cache, the full distribution of every
                # position (its columns over the document's whole vocabulary) costs far more.
                output = model(input_ids.to(device), state=state, reset=reset.to(device), targets=targets, return_logits=False)
                state = output.state
                nll, scored = output.token_losses, targets != IGNORE_INDEX
                busy = [row for row, row_window in enumerate(windows) if row_window is not None]
                positions = torch.tensor([windows[row].start for row in busy])[:, None] + torch.arange(window)
                bar.update(tally.add([windows[row].article for row in busy], nll[busy], scored[busy], positions))
                if on_window is not None:
                    on_window(windows, state, nll)
                windows = feeder.next_windows()
    finally:
        model.train(was_training)
    return tally


def _window_batch(
    corpus: TokenizedCorpus, windows: list[ArticleWindow | None], length: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs and targets [B, length] of one call, and which rows start from a fresh state.

    Every call has the same shape, so a compiled model never recompiles. The padding after a short
    window, or on a row with no article left, is harmless: it comes after every real token of its
    row, and the row is reset before it holds a real token again.
    """
    input_ids = torch.zeros(len(windows), length, dtype=torch.long)
    targets = torch.full((len(windows), length), IGNORE_INDEX, dtype=torch.long)
    reset = torch.ones(len(windows), dtype=torch.bool)
    for row, window in enumerate(windows):
        if window is None:
            continue
        inputs, next_tokens = input_target_pairs(corpus, window.article, window.start, window.stop)
        input_ids[row, : len(inputs)] = inputs
        targets[row, : len(inputs)] = next_tokens
        reset[row] = window.reset
    return input_ids, targets, reset
