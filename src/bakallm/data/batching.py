"""Batches of fixed-length windows cut from whole documents, for recurrent models that carry state across steps.

Each of the B rows of a batch follows one document at a time, `train_ctx` tokens per step, so a
model can carry its recurrent state from one step to the next on each row. `reset[b]` tells the
model to start row b from a fresh state. Targets are the next tokens of the same document: a
document of n tokens gives inputs tok[0..n-2] and targets tok[1..n-1], so every token but the first
is a target exactly once per epoch. Documents of fewer than 2 tokens have no targets and are skipped.

With `max_doc_tokens`, a longer document is cut into independent pieces of that many targets
(each piece re-reads the previous piece's last token as its first input), which the batcher
treats as documents of their own.

Epochs form one stream: a row whose document ends takes the next document of the stream, which
may belong to the next epoch, so no row waits for the slowest one at an epoch boundary. Only the
end of the run (`max_epochs`) drains: rows idle there until the last document ends.

Modes:
  dynamic  a row whose document ended takes the next document at the next step;
  static   B documents start together, and the next B start only when all of them have ended;
  windows  every row of every step reads a window drawn at random from one document (each start
           equally likely, a full `train_ctx` window wherever the document is long enough) and
           starts from a fresh state: how plain transformers are usually trained. An "epoch" is
           then as many targets as the corpus holds; some tokens are read twice, some never.

Data-parallel ranks share one global batch: every rank runs the same batcher over all N x B rows
(it only moves document offsets, which is cheap) and materialises only its own `rows`, so the
union of the ranks' rows is exactly the batch a single process with N x B rows would get.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError

DOCUMENT_MODES = ("dynamic", "static")  # the modes that read every document through once per epoch
MODES = (*DOCUMENT_MODES, "windows")
IGNORE_INDEX = -100  # the target of padding; torch's cross-entropy skips it by default
_FREE = -1  # row state: no document in progress


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # int64 [B, train_ctx]; pad_id where a row has no input
    targets: torch.Tensor  # int64 [B, train_ctx]; IGNORE_INDEX where there is no target
    reset: torch.Tensor  # bool [B]; the row starts a new document or is idle padding
    n_targets: int  # targets in the rows returned here
    total_targets: int  # targets in every row of the batch, including the rows other ranks materialise
    total_inputs: int  # positions holding a token in every row: the targets, unless some tokens are not scored
    epoch: int  # the oldest epoch not yet complete when this batch started
    epoch_fraction: float  # share of that epoch's targets delivered up to and including this batch
    epochs_ended: int  # epochs completed by this batch (0, usually 1 at an epoch's last batch)

    @property
    def epoch_end(self) -> bool:
        """This batch completes at least one epoch."""
        return self.epochs_ended > 0

    @property
    def padding_share(self) -> float:
        """Share of the batch's positions that hold no target."""
        return 1.0 - self.n_targets / self.targets.numel()


@dataclass(frozen=True)
class _Step:
    """Where every row reads in one batch, before any token is copied."""

    windows: list[tuple[int, int]]  # per row: offset of the first input token, number of targets
    reset: list[bool]
    epoch: int
    epoch_fraction: float
    epochs_ended: int


class DocumentBatcher:
    """Endless batches over the documents of a corpus, epoch after epoch (or `max_epochs` of them)."""

    def __init__(
        self,
        corpus: TokenizedCorpus,
        batch_size: int,
        train_ctx: int,
        mode: str = "dynamic",
        shuffle: bool = False,
        seed: int = 0,
        pad_id: int = 0,
        max_epochs: int | None = None,
        max_doc_tokens: int | None = None,
        rows: range | None = None,
        scored: np.ndarray | None = None,
    ) -> None:
        """`rows`: the rows of the batch to return (default all); the others are tracked but not read.
        `scored`: one bool per token of the corpus, False where that token is not a target (default: all are)."""
        if mode not in MODES:
            raise UserError(f"Unknown batching mode {mode!r}; use one of {', '.join(MODES)}.")
        if batch_size < 1 or train_ctx < 1:
            raise UserError(f"Batch size and training context must be at least 1 (got {batch_size} and {train_ctx}).")
        rows = range(batch_size) if rows is None else rows
        if rows.step != 1 or len(rows) == 0 or rows.start < 0 or rows.stop > batch_size:
            raise ValueError(
                f"rows must be a non-empty contiguous range inside the batch's {batch_size} rows, got {rows}."
            )
        if max_doc_tokens is not None and max_doc_tokens < 1:
            raise UserError(f"The longest document piece must hold at least 1 token (got {max_doc_tokens}).")
        starts, ends = _pieces(corpus.offsets, max_doc_tokens)
        trainable = ends - starts >= 2
        if not trainable.any():
            raise UserError(
                "No document of the corpus has 2 or more tokens, so there is nothing to train on; use a larger corpus."
            )
        self.corpus = corpus
        self.batch_size = batch_size
        self.train_ctx = train_ctx
        self.mode = mode
        self.shuffle = shuffle
        self.seed = seed
        self.pad_id = pad_id
        self.max_epochs = max_epochs
        self.max_doc_tokens = max_doc_tokens
        self.rows = rows
        if scored is not None and scored.shape != (corpus.n_tokens,):
            raise ValueError(
                f"scored must hold one flag per token of the corpus ({corpus.n_tokens}), got shape {scored.shape}"
            )
        self.scored = scored
        self._unit_starts = starts[trainable]
        self._unit_ends = ends[trainable]
        self._unit_targets = self._unit_ends - self._unit_starts - 1
        self._targets_per_epoch = int(self._unit_targets.sum())
        # windows mode: unit u offers max(targets - train_ctx, 0) + 1 starts, numbered consecutively.
        self._unit_window_starts = np.maximum(self._unit_targets - train_ctx, 0) + 1
        self._window_start_ends = np.cumsum(self._unit_window_starts)
        self._orders: dict[int, np.ndarray] = {}
        self._reset_position()

    def _reset_position(self) -> None:
        self.epoch = 0  # the oldest epoch not yet complete
        self._next_epoch = 0  # the stream position: the epoch and index of the next document to hand out
        self._next_index = 0
        self._row_units = [_FREE] * self.batch_size
        self._row_epochs = [0] * self.batch_size
        self._row_positions = [0] * self.batch_size
        self._targets_done: dict[int, int] = {}  # targets delivered, per epoch still in progress
        self._windows_drawn = 0  # windows mode: steps taken (each step's draws come from its own seed)
        self._targets_delivered = 0  # windows mode: targets delivered since the start

    def __iter__(self) -> Iterator[Batch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def next_batch(self) -> Batch | None:
        """The next batch, or None once `max_epochs` epochs have been delivered."""
        step = self._advance()
        if step is None:
            return None
        input_ids = np.full((len(self.rows), self.train_ctx), self.pad_id, dtype=np.int64)
        targets = np.full((len(self.rows), self.train_ctx), IGNORE_INDEX, dtype=np.int64)
        for own_row, (start, count) in enumerate(step.windows[self.rows.start : self.rows.stop]):
            input_ids[own_row, :count] = self.corpus.tokens[start : start + count]
            targets[own_row, :count] = self.corpus.tokens[start + 1 : start + count + 1]
            if self.scored is not None:
                targets[own_row, :count][~self.scored[start + 1 : start + count + 1]] = IGNORE_INDEX
        return Batch(
            input_ids=torch.from_numpy(input_ids),
            targets=torch.from_numpy(targets),
            reset=torch.from_numpy(np.array(step.reset[self.rows.start : self.rows.stop])),
            n_targets=int((targets != IGNORE_INDEX).sum()),
            total_targets=sum(self._scored_count(start, count) for start, count in step.windows),
            total_inputs=sum(count for _, count in step.windows),
            epoch=step.epoch,
            epoch_fraction=step.epoch_fraction,
            epochs_ended=step.epochs_ended,
        )

    def _scored_count(self, start: int, count: int) -> int:
        """Targets among the `count` tokens after `start`."""
        return count if self.scored is None else int(np.count_nonzero(self.scored[start + 1 : start + count + 1]))

    @property
    def targets_per_epoch(self) -> int:
        return self._targets_per_epoch

    @property
    def longest_document_targets(self) -> int:
        """Targets of the longest training unit (a document, or a piece of one under `max_doc_tokens`)."""
        return int(self._unit_targets.max())

    @property
    def exhausted(self) -> bool:
        """All `max_epochs` epochs have been delivered: `next_batch()` gives None."""
        if self.mode == "windows":
            return self.max_epochs is not None and self._targets_delivered >= self.max_epochs * self._targets_per_epoch
        return self._stream_ended() and all(unit == _FREE for unit in self._row_units)

    def count_batches(self) -> int:
        """Batches until `max_epochs` epochs are delivered, from a fresh start, without reading a token."""
        if self.max_epochs is None:
            raise ValueError("count_batches needs max_epochs: without it the batches never end")
        simulator = copy.copy(self)  # shares the corpus and settings; the position is its own
        simulator._orders = {}
        simulator._reset_position()
        count = 0
        while simulator._advance() is not None:
            count += 1
        return count

    # ----- the schedule of rows over documents, without tokens -----
    def _advance(self) -> _Step | None:
        """Moves every row one step on; None once the stream has ended."""
        if self.exhausted:
            return None
        if self.mode == "windows":
            return self._draw_windows()
        epoch = self.epoch
        reset = [unit == _FREE for unit in self._row_units]
        self._assign_units()
        windows = []
        for row, unit in enumerate(self._row_units):
            if unit == _FREE:
                windows.append((0, 0))
                continue
            start = int(self._unit_starts[unit]) + self._row_positions[row]
            last = int(self._unit_ends[unit]) - 1  # the last token is only ever a target
            count = min(self.train_ctx, last - start)
            windows.append((start, count))
            row_epoch = self._row_epochs[row]
            self._targets_done[row_epoch] = self._targets_done.get(row_epoch, 0) + count
            if start + count == last:
                self._row_units[row], self._row_positions[row] = _FREE, 0
            else:
                self._row_positions[row] += count
        self.epoch = min([self._next_epoch] + [e for e, u in zip(self._row_epochs, self._row_units) if u != _FREE])
        fraction = self._targets_done.get(epoch, 0) / self._targets_per_epoch
        for finished in [e for e in self._targets_done if e < self.epoch]:
            del self._targets_done[finished]
        for finished in [e for e in self._orders if e < self.epoch]:
            del self._orders[finished]
        return _Step(windows, reset, epoch, fraction, self.epoch - epoch)

    def _draw_windows(self) -> _Step:
        draws = np.random.default_rng([self.seed, self._windows_drawn]).integers(
            self._window_start_ends[-1], size=self.batch_size
        )
        units = np.searchsorted(self._window_start_ends, draws, side="right")
        starts = self._unit_starts[units] + draws - (self._window_start_ends[units] - self._unit_window_starts[units])
        counts = np.minimum(self.train_ctx, self._unit_ends[units] - 1 - starts)
        per_epoch, before = self._targets_per_epoch, self._targets_delivered
        self._windows_drawn += 1
        self._targets_delivered += int(counts.sum())
        self.epoch = self._targets_delivered // per_epoch
        epoch = before // per_epoch
        fraction = min(1.0, (self._targets_delivered - epoch * per_epoch) / per_epoch)
        windows = [(int(start), int(count)) for start, count in zip(starts, counts)]
        return _Step(windows, [True] * self.batch_size, epoch, fraction, self.epoch - epoch)

    def _stream_ended(self) -> bool:
        return self.max_epochs is not None and self._next_epoch >= self.max_epochs

    def _assign_units(self) -> None:
        free_rows = [row for row, unit in enumerate(self._row_units) if unit == _FREE]
        if self.mode == "static" and len(free_rows) < self.batch_size:
            return  # the group in progress has not ended yet: free rows stay idle
        for row in free_rows:
            if self._stream_ended():
                return
            self._row_units[row] = int(self._order(self._next_epoch)[self._next_index])
            self._row_epochs[row] = self._next_epoch
            self._next_index += 1
            if self._next_index == len(self._unit_starts):
                self._next_epoch, self._next_index = self._next_epoch + 1, 0

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            units = np.arange(len(self._unit_starts))
            self._orders[epoch] = (
                np.random.default_rng([self.seed, epoch]).permutation(units) if self.shuffle else units
            )
        return self._orders[epoch]

    # ----- saving and restoring the position -----
    def _settings(self) -> dict[str, Any]:
        # A saved position only means something for the same corpus and the same batching settings.
        return {
            "corpus_fingerprint": self.corpus.fingerprint,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "train_ctx": self.train_ctx,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "max_doc_tokens": self.max_doc_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the data, as plain JSON-serialisable values."""
        return {
            **self._settings(),
            "epoch": self.epoch,
            "next_epoch": self._next_epoch,
            "next_document": self._next_index,
            "row_documents": list(self._row_units),
            "row_epochs": list(self._row_epochs),
            "row_positions": list(self._row_positions),
            "targets_done": [[epoch, count] for epoch, count in sorted(self._targets_done.items())],
            "windows_drawn": self._windows_drawn,
            "targets_delivered": self._targets_delivered,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the batcher that saved `state` stopped."""
        for setting, value in self._settings().items():
            if state.get(setting) != value:
                raise UserError(
                    f"The saved data position was made with a different {setting}; "
                    "resume with the same corpus and batching settings."
                )
        self.epoch = state["epoch"]
        self._orders = {}
        self._next_epoch = state["next_epoch"]
        self._next_index = state["next_document"]
        self._row_units = list(state["row_documents"])
        self._row_epochs = list(state["row_epochs"])
        self._row_positions = list(state["row_positions"])
        self._targets_done = {int(epoch): int(count) for epoch, count in state["targets_done"]}
        self._windows_drawn = int(state.get("windows_drawn", 0))  # absent from positions saved before windows mode
        self._targets_delivered = int(state.get("targets_delivered", 0))


def _pieces(offsets: np.ndarray, max_doc_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Token ranges [start, end) of the training units: whole documents, or pieces of at most
    `max_doc_tokens` targets each; a piece's first token is the previous piece's last target."""
    starts, ends = offsets[:-1].astype(np.int64), offsets[1:].astype(np.int64)
    if max_doc_tokens is None:
        return starts, ends
    targets = np.maximum(ends - starts - 1, 0)
    n_pieces = np.maximum(-(-targets // max_doc_tokens), 1)
    document = np.repeat(np.arange(len(starts)), n_pieces)
    index_in_document = np.arange(len(document)) - np.repeat(np.cumsum(n_pieces) - n_pieces, n_pieces)
    piece_starts = starts[document] + index_in_document * max_doc_tokens
    piece_ends = np.minimum(piece_starts + max_doc_tokens + 1, ends[document])
    return piece_starts, piece_ends
