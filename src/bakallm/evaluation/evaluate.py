"""Whole-article evaluation of our recurrent models.

Every kind of model scores the same tokens of each tokenized article (bakallm.evaluation.articles):
all of them but the first, each exactly once, predicted from earlier tokens of the same article;
the figures follow from the summed losses (bakallm.evaluation.tally). See docs/benchmark.md for the
definitions and the choices.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError
from bakallm.evaluation.articles import (
    article_length,
    input_target_pairs,
    require_positive,
    require_vocabulary_fits,
    scorable_articles,
    scoring_progress,
)
from bakallm.evaluation.memory import PeakMemory
from bakallm.evaluation.settings import EvalSettings
from bakallm.evaluation.tally import ArticleLossTally, EvalResult
from bakallm.model.network import IGNORE_INDEX, BakaLM
from bakallm.model.state import RecurrentState

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
            self._row_windows[row] = bakallm_windows(
                article, article_length(self._corpus, article), self._n_ctx, self._window
            )


def evaluate_bakallm(
    model: BakaLM, corpus: TokenizedCorpus, settings: EvalSettings, on_window: WindowHook | None = None
) -> EvalResult:
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


def score_articles(
    model: BakaLM, corpus: TokenizedCorpus, settings: EvalSettings, on_window: WindowHook | None = None
) -> ArticleLossTally:
    """The token losses of every article, as `evaluate_bakallm` reads them, summed per article.

    `on_window`, when given, sees each call's windows (None for an idle row), the state after them and their token losses.
    """
    window, n_ctx, autocast = model.config.window, settings.n_ctx, settings.autocast
    if n_ctx < window:
        raise UserError(
            f"n_ctx {n_ctx} is smaller than the model's window of {window} tokens; pass an n_ctx of at least {window}."
        )
    require_positive("The batch size", settings.batch_size)
    require_vocabulary_fits(corpus.vocab_size, model.config.vocab_size)
    device = torch.device(settings.device)
    feeder = _RowFeeder(corpus, n_ctx, window, settings.batch_size)
    tally = ArticleLossTally(len(corpus), settings.position_buckets)
    precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with (
            torch.inference_mode(),
            precision,
            scoring_progress(corpus, settings.progress) as bar,
        ):
            state = model.init_state(feeder.n_rows, device)
            windows = feeder.next_windows()
            while any(windows):
                input_ids, targets, reset = _window_batch(corpus, windows, window)
                targets = targets.to(device)
                # The targets' losses only: with the document cache, the full distribution of every
                # position (its columns over the document's whole vocabulary) costs far more.
                output = model(
                    input_ids.to(device), state=state, reset=reset.to(device), targets=targets, return_logits=False
                )
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
