"""Scoring long-range recall: does a model answer a query about a fact it read a given distance ago?

Each sample (bakallm.data.recall) ends with a query and its answer. A model reads the sample up to
the answer's last token; what it predicts at each answer position, given the true answer tokens
before it, is scored: its loss, whether the most likely token is right at the first answer position,
and whether it is right at every one of them (then greedy decoding writes the whole answer: the
exact match). Our models read the whole sample with their state carried (reset every n_ctx tokens
when asked); a Hugging Face model reads the last n_ctx tokens before the answer, as its sliding
window does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bakallm.data.recall import EXACT_MATCH_CHANCE, FactWriter, RecallSample, filler_stream, recall_samples
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.data.tokenizers import Tokenizer
from bakallm.errors import UserError
from bakallm.model.network import BakaLM

DEFAULT_DISTANCES = (0.5, 1.0, 2.0, 4.0, 16.0, 64.0, 256.0)
# Windows per call where no answer is predicted: long enough to amortise a call, short enough that
# one call's activations stay small.
WINDOWS_PER_CALL = 16


@dataclass(frozen=True)
class RecallScore:
    """The figures of one distance."""

    distance_windows: float
    distance_tokens: int
    accuracy: float  # share of samples whose whole answer is the greedy continuation
    first_token_accuracy: float  # share of samples whose answer's first token is the most likely one
    answer_loss: float  # nats per answer token
    samples: int
    answer_tokens: int
    chance: float  # accuracy of guessing the code
    first_token_chance: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


class RecallTally:
    """Adds up the answers of the samples of one distance."""

    def __init__(self) -> None:
        self.samples = self.exact = self.first = self.answer_tokens = 0
        self.loss_sum = 0.0

    def add(self, log_probs: torch.Tensor, answer: torch.Tensor) -> None:
        """One sample: log-probabilities [n, V] at its n answer positions, and the answer [n]."""
        correct = log_probs.argmax(-1) == answer
        self.samples += 1
        self.exact += int(correct.all())
        self.first += int(correct[0])
        self.answer_tokens += len(answer)
        self.loss_sum += float(-log_probs.gather(1, answer[:, None]).sum())

    def score(
        self, distance_windows: float, distance_tokens: int, chance: float, first_token_chance: float
    ) -> RecallScore:
        samples = max(self.samples, 1)
        return RecallScore(
            distance_windows=distance_windows,
            distance_tokens=distance_tokens,
            accuracy=self.exact / samples,
            first_token_accuracy=self.first / samples,
            answer_loss=self.loss_sum / self.answer_tokens if self.answer_tokens else math.nan,
            samples=self.samples,
            answer_tokens=self.answer_tokens,
            chance=chance,
            first_token_chance=first_token_chance,
        )


def _padded(samples: Sequence[RecallSample], length: int) -> torch.Tensor:
    """Each sample's inputs (every token but the last), right-padded with token 0 to `length`."""
    rows = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        inputs = torch.from_numpy(sample.tokens[:-1])[:length]
        rows[row, : len(inputs)] = inputs
    return rows


def _batches(samples: Sequence[RecallSample], batch_size: int) -> Iterator[Sequence[RecallSample]]:
    for start in range(0, len(samples), batch_size):
        yield samples[start : start + batch_size]


def bakallm_answer_log_probs(
    model: BakaLM,
    samples: Sequence[RecallSample],
    batch_size: int,
    device: torch.device,
    n_ctx: int | None = None,
    keep_document_cache: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probabilities at the answer positions [n, V], answer [n]) of each sample, in order.

    The state is carried through the sample and reset every `n_ctx` tokens (never when None);
    with `keep_document_cache`, a reset clears only the network's state, not the document cache.
    Windows start at the sample's start and at every reset, as in whole-article evaluation. Only
    the calls that reach an answer position compute logits.
    """
    window = model.config.window
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield from _bakallm_batches(model, samples, batch_size, device, window, n_ctx, keep_document_cache)
    finally:
        model.train(was_training)


def _bakallm_batches(
    model: BakaLM,
    samples: Sequence[RecallSample],
    batch_size: int,
    device: torch.device,
    window: int,
    n_ctx: int | None,
    keep_document_cache: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in _batches(samples, batch_size):
        length = max(len(sample.tokens) - 1 for sample in batch)
        inputs = _padded(batch, length).to(device)
        first_prediction = min(sample.answer_start - 1 for sample in batch)
        state = model.init_state(len(batch), device)
        collected: list[list[torch.Tensor]] = [[] for _ in batch]
        start = 0
        while start < length:
            segment_start = 0 if n_ctx is None else start - start % n_ctx
            segment_stop = length if n_ctx is None else min(segment_start + n_ctx, length)
            if start == segment_start and start > 0:
                state = state.reset(
                    torch.ones(len(batch), dtype=torch.bool, device=device), keep_document_cache=keep_document_cache
                )
            whole_windows = (first_prediction - start) // window * window  # inputs before the first answer position
            stop = min(
                segment_stop, start + (min(whole_windows, WINDOWS_PER_CALL * window) if whole_windows > 0 else window)
            )
            wants_logits = stop > first_prediction
            output = model(inputs[:, start:stop], state=state, return_logits=wants_logits)
            state = output.state
            if wants_logits:
                log_probs = F.log_softmax(output.logits.float(), dim=-1)
                for row, sample in enumerate(batch):
                    low, high = max(sample.answer_start - 1, start), min(len(sample.tokens) - 1, stop)
                    if low < high:
                        collected[row].append(log_probs[row, low - start : high - start])
            start = stop
        for row, sample in enumerate(batch):
            yield torch.cat(collected[row]).cpu(), torch.from_numpy(sample.answer)


def hf_answer_log_probs(
    model: torch.nn.Module, samples: Sequence[RecallSample], n_ctx: int, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Like `bakallm_answer_log_probs` for a transformers causal LM, which reads the n_ctx inputs that
    end at the answer's last input: the window of a sliding-window evaluation that ends there."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield from _hf_batches(model, samples, n_ctx, batch_size, device)
    finally:
        model.train(was_training)


def _hf_batches(
    model: torch.nn.Module, samples: Sequence[RecallSample], n_ctx: int, batch_size: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for batch in _batches(samples, batch_size):
        windows = [sample.tokens[max(len(sample.tokens) - 1 - n_ctx, 0) : len(sample.tokens) - 1] for sample in batch]
        length = max(len(window) for window in windows)
        inputs = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, window in enumerate(windows):
            inputs[row, : len(window)] = torch.from_numpy(window)
            mask[row, : len(window)] = 1
        logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits
        for row, (sample, window) in enumerate(zip(batch, windows)):
            n_answer = len(sample.answer)
            answer_logits = logits[row, len(window) - n_answer : len(window)].float()
            yield F.log_softmax(answer_logits, dim=-1).cpu(), torch.from_numpy(sample.answer)


# (samples, n_ctx, batch_size, keep_document_cache) -> each sample's (answer log-probabilities, answer)
AnswerLogProbs = Callable[[Sequence[RecallSample], int, int, bool], Iterator[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class RecallSettings:
    """What a recall measurement asks: the same for `bakallm bench --task recall` and `bakallm ablate`."""

    distances: tuple[float, ...] = DEFAULT_DISTANCES  # in windows
    samples: int = 100  # per distance
    seed: int = 0
    depth_windows: float | None = None  # filler before the fact; None: drawn from [0, 1) window per sample
    facts: int = 1  # facts planted one after another; the query asks about one of them
    keep_document_cache: bool = False  # resets clear the network's state but keep the document cache

    def __post_init__(self) -> None:
        for name in ("samples", "facts"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.depth_windows is not None and not self.depth_windows >= 0:
            raise UserError(f"--depth must be at least 0 windows, got {self.depth_windows}.")

    def extra(self, window: int) -> dict:
        """What a result row records of these settings, with the window that is their unit."""
        return {
            "window": window,
            "seed": self.seed,
            "samples": self.samples,
            "facts": self.facts,
            "depth_windows": self.depth_windows,
            "keep_document_cache": self.keep_document_cache,
        }


@dataclass(frozen=True)
class RecallTest:
    """The samples of every distance, drawn once and scored at every context."""

    settings: RecallSettings
    window: int
    sample_sets: tuple[tuple[float, list[RecallSample]], ...]
    first_token_chance: float

    @classmethod
    def draw(cls, settings: RecallSettings, filler: TokenizedCorpus, tokenizer: Tokenizer, window: int) -> RecallTest:
        """Draws every sample now, so that a distance the filler cannot hold is refused before anything is scored."""
        writer = FactWriter(tokenizer)
        stream = filler_stream(filler)
        depth = None if settings.depth_windows is None else round(settings.depth_windows * window)
        sample_sets = tuple(
            (
                distance,
                recall_samples(
                    stream,
                    writer,
                    round(distance * window),
                    settings.samples,
                    settings.seed,
                    depth,
                    window,
                    settings.facts,
                ),
            )
            for distance in settings.distances
        )
        return cls(settings, window, sample_sets, writer.first_token_chance())

    def score(
        self, answer_log_probs: AnswerLogProbs, n_ctx: int, batch_size: int, progress: bool = False
    ) -> list[RecallScore]:
        """The figures of every distance for a model that reads with `answer_log_probs`."""
        total = sum(len(samples) for _, samples in self.sample_sets)
        scores = []
        with tqdm(total=total, unit="sample", desc=f"recall, n_ctx {n_ctx}", disable=None if progress else True) as bar:
            for distance, samples in self.sample_sets:
                tally = RecallTally()
                for log_probs, answer in answer_log_probs(
                    samples, n_ctx, batch_size, self.settings.keep_document_cache
                ):
                    tally.add(log_probs, answer)
                    bar.update()
                scores.append(
                    tally.score(distance, samples[0].distance_tokens, EXACT_MATCH_CHANCE, self.first_token_chance)
                )
        return scores

    @property
    def read_tokens(self) -> int:
        """Tokens a model reads to score every sample once."""
        return sum(len(sample.tokens) - 1 for _, samples in self.sample_sets for sample in samples)


def recall_figures(scores: Sequence[RecallScore]) -> dict:
    """The result-row fields of a recall measurement: loss, perplexity and tokens are the answers'."""
    answer_tokens = sum(score.answer_tokens for score in scores)
    loss = sum(score.answer_loss * score.answer_tokens for score in scores) / answer_tokens
    return {
        "task": "recall",
        "tokens": answer_tokens,
        "loss": loss,
        "ppl": math.exp(loss),
        "recall": [score.to_dict() for score in scores],
    }
