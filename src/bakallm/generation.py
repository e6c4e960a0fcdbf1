"""Text generation with the recurrent state: read a prompt of any length, then decode token by token.

`IncrementalReader` reads tokens of a batch of documents in pieces of any size through the model's
window runtime (`bakallm.model.window.WindowReader`), the one a forward call goes through. Whole
windows are read in one pass as in a forward call; a piece that leaves a window unfinished keeps
that window's keys and values per layer (in buffers of the window's length) and the running Mamba
states, so the next token costs one position through every layer: attention over [previous
window's cache, this window's read memory and positions so far], a one-step Mamba update, and the
pause before it when one falls there. When a window fills, its write slots run and the state is
committed exactly as a forward call commits it. Decoding therefore costs the same at the
millionth token of a document as at the first.

`generate` samples from those logits (greedy, temperature, top-k, top-p, seeded); `generate_text`
adds the tokenizer, stop strings and streaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bakallm.model.network import BakaLM
from bakallm.model.state import RecurrentState
from bakallm.model.window import WindowReader


class IncrementalReader:
    """The model's reading position in a batch of documents that all have the same length so far:
    the model's window runtime (`bakallm.model.window.WindowReader`), which reads pieces and commits
    each window when it is full, with the logits of the token that follows."""

    def __init__(self, model: BakaLM, batch_size: int, device: torch.device | str | None = None):
        config = model.config
        if config.memory_layout != "learned_slots" or config.memory_readout != "write_slots":
            raise ValueError(
                "Incremental reading supports the learned_slots memory layout with the write_slots read-out (our default); "
                f"this model uses {config.memory_layout} with {config.memory_readout}, so score it with a forward call instead."
            )
        self.model = model
        self.window = WindowReader(model, model.init_state(batch_size, device), fresh=True)

    @property
    def state(self) -> RecurrentState:
        """Committed after the last full window, with the document cache's counts of everything read."""
        return self.window.state

    @property
    def tokens_in_window(self) -> int:
        return self.window.tokens_in_window

    def read(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reads input_ids [B, n] (n >= 1) after everything read so far; returns the logits [B, vocab]
        for the token that follows them."""
        window, size = self.window, self.model.config.window
        start, hidden = 0, None
        while start < input_ids.shape[1]:
            # A whole window at a window's start is read in one pass with its write slots, as a forward call reads it.
            whole = window.tokens_in_window == 0 and input_ids.shape[1] - start >= size
            take = size if whole else min(input_ids.shape[1] - start, size - window.tokens_in_window)
            hidden = window.read(input_ids[:, start : start + take], ends_window=whole)[:, -1]
            start += take
            if window.window_full:
                window.commit()
        return self.model.logits(hidden, window.state)


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn from the logits. temperature 0 is greedy (argmax); top_k 0 and
    top_p 1 keep every token; a seed makes the draws repeatable."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token [B] for logits [B, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if 0 < sampling.top_k < scores.shape[-1]:
        kth_best = scores.topk(sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, -math.inf)
    if sampling.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probabilities = sorted_scores.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely always stays.
        beyond = probabilities.cumsum(dim=-1) - probabilities >= sampling.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(beyond, -math.inf))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.seed is None or sampling.temperature == 0:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


@torch.inference_mode()
def generate(
    model: BakaLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    on_token: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """New token ids for each prompt (token id lists, each of at least one token).

    Prompts of the same length are read and decoded together as one batch. `on_token(prompt index,
    token id)` is called for every new token as soon as it is drawn and returns True when that
    prompt should stop (e.g. a stop string appeared); its token is kept.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}.")
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("Every prompt needs at least one token to condition on.")
    device = model.embed.weight.device
    generator = _generator(sampling, device)
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    try:
        by_length: dict[int, list[int]] = {}
        for index, prompt in enumerate(prompts):
            by_length.setdefault(len(prompt), []).append(index)
        for rows in by_length.values():
            _decode_rows(
                model,
                [prompts[row] for row in rows],
                rows,
                outputs,
                max_new_tokens,
                sampling,
                generator,
                on_token,
                device,
            )
    finally:
        model.train(was_training)
    return outputs


def _decode_rows(model, prompts, rows, outputs, max_new_tokens, sampling, generator, on_token, device) -> None:
    if max_new_tokens == 0:
        return
    reader = IncrementalReader(model, len(rows), device)
    logits = reader.read(torch.tensor(prompts, dtype=torch.long, device=device))
    running = [True] * len(rows)
    for step in range(max_new_tokens):
        next_tokens = sample_next(logits, sampling, generator)
        for slot, token in enumerate(next_tokens.tolist()):
            if running[slot]:
                outputs[rows[slot]].append(token)
                if on_token is not None and on_token(rows[slot], token):
                    running[slot] = False
        if not any(running) or step == max_new_tokens - 1:
            return
        logits = reader.read(next_tokens.unsqueeze(1))


class _TextStream:
    """The text of one prompt's new tokens: where it stops, and what has been shown of it so far."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [text for text in stop if text]
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.stopped = False

    def add(self, token: int) -> bool:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        cuts = [self.text.find(text, max(self.shown - len(text), 0)) for text in self.stop]
        cuts = [cut for cut in cuts if cut >= 0]
        if cuts:
            self.text = self.text[: min(cuts)]
            self.stopped = True
        return self.stopped

    def unshown(self, final: bool) -> str:
        """Text not shown yet that is settled: not a cut multi-byte character, not a possible start of a stop string."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            end -= max((len(text) - 1 for text in self.stop), default=0)
        piece = self.text[self.shown : max(end, self.shown)]
        self.shown += len(piece)
        return piece


def generate_text(
    model: BakaLM,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The continuation of each prompt text, cut before the first stop string.

    `on_text(prompt index, piece)` receives each prompt's text as it is produced (streaming); the
    pieces of one prompt add up to its returned continuation.
    """
    streams = [_TextStream(tokenizer, stop) for _ in prompts]

    def on_token(index: int, token: int) -> bool:
        stopped = streams[index].add(token)
        if on_text is not None:
            piece = streams[index].unshown(final=stopped)
            if piece:
                on_text(index, piece)
        return stopped

    prompt_ids = tokenizer.encode_batch(list(prompts))
    if any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("A prompt gives no tokens; give each prompt some text.")
    generate(model, prompt_ids, max_new_tokens, sampling, on_token)
    if on_text is not None:
        for index, stream in enumerate(streams):
            piece = stream.unshown(final=True)
            if piece:
                on_text(index, piece)
    return [stream.text for stream in streams]
