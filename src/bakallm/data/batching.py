"""Batches of fixed-length windows cut from whole documents, for recurrent models that carry state across steps.

Each of the B rows of a batch follows one document at a time, `train_ctx` tokens per step, so a
model can carry its recurrent state from one step to the next on each row. `reset[b]` tells the
model to start row b from a fresh state. Targets are the next tokens of the same document: a
document of n tokens gives inputs tok[0..n-2] and targets tok[1..n-1], so every token but the first
is a target exactly once per epoch. Documents of fewer than 2 tokens have no targets and are skipped.

Modes:
  dynamic  a row whose document ended takes the next document at the next step;
  static   B documents start together, and the next B start only when all of them have ended.

Data-parallel ranks share one global batch: every rank runs the same batcher over all N x B rows
(it only moves document offsets, which is cheap) and materialises only its own `rows`, so the
union of the ranks' rows is exactly the batch a single process with N x B rows would get.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError

MODES = ("dynamic", "static")
IGNORE_INDEX = -100  # the target of padding; torch's cross-entropy skips it by default
_FREE = -1  # row state: no document in progress


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # int64 [B, train_ctx]; pad_id where a row has no input
    targets: torch.Tensor  # int64 [B, train_ctx]; IGNORE_INDEX where there is no target
    reset: torch.Tensor  # bool [B]; the row starts a new document or is idle padding
    n_targets: int  # targets in the rows returned here
    total_targets: int  # targets in every row of the batch, including the rows other ranks materialise
    epoch: int
    epoch_fraction: float  # share of this epoch's targets delivered up to and including this batch
    epoch_end: bool  # this is the last batch of the epoch


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
        rows: range | None = None,
    ) -> None:
        """`rows`: the rows of the batch to return (default all); the others are tracked but not read."""
        if mode not in MODES:
            raise UserError(f"Unknown batching mode {mode!r}; use one of {', '.join(MODES)}.")
        if batch_size < 1 or train_ctx < 1:
            raise UserError(f"Batch size and training context must be at least 1 (got {batch_size} and {train_ctx}).")
        rows = range(batch_size) if rows is None else rows
        if rows.step != 1 or len(rows) == 0 or rows.start < 0 or rows.stop > batch_size:
            raise ValueError(f"rows must be a non-empty contiguous range inside the batch's {batch_size} rows, got {rows}.")
        lengths = np.diff(corpus.offsets)
        self._trainable_documents = np.flatnonzero(lengths >= 2)
        if self._trainable_documents.size == 0:
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
        self.rows = rows
        self._targets_per_epoch = int((lengths[self._trainable_documents] - 1).sum())
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.shuffle:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self._trainable_documents)
        else:
            self._order = self._trainable_documents
        self._next_document = 0
        self._row_documents = [_FREE] * self.batch_size
        self._row_positions = [0] * self.batch_size
        self._targets_done = 0

    def __iter__(self) -> Iterator[Batch]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def next_batch(self) -> Batch | None:
        """The next batch, or None once `max_epochs` epochs have been delivered."""
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            return None
        reset = np.array([self._row_documents[row] == _FREE for row in self.rows])
        self._assign_documents()
        input_ids = np.full((len(self.rows), self.train_ctx), self.pad_id, dtype=np.int64)
        targets = np.full((len(self.rows), self.train_ctx), IGNORE_INDEX, dtype=np.int64)
        n_targets = total_targets = 0
        for row, document in enumerate(self._row_documents):
            if document == _FREE:
                continue
            start = int(self.corpus.offsets[document]) + self._row_positions[row]
            last = int(self.corpus.offsets[document + 1]) - 1  # the last token is only ever a target
            count = min(self.train_ctx, last - start)
            if row in self.rows:
                own_row = row - self.rows.start
                input_ids[own_row, :count] = self.corpus.tokens[start : start + count]
                targets[own_row, :count] = self.corpus.tokens[start + 1 : start + count + 1]
                n_targets += count
            total_targets += count
            if start + count == last:
                self._row_documents[row], self._row_positions[row] = _FREE, 0
            else:
                self._row_positions[row] += count
        self._targets_done += total_targets
        batch = Batch(
            input_ids=torch.from_numpy(input_ids),
            targets=torch.from_numpy(targets),
            reset=torch.from_numpy(reset),
            n_targets=n_targets,
            total_targets=total_targets,
            epoch=self.epoch,
            epoch_fraction=self._targets_done / self._targets_per_epoch,
            epoch_end=self._next_document == len(self._order) and all(d == _FREE for d in self._row_documents),
        )
        if batch.epoch_end:
            self._start_epoch(self.epoch + 1)
        return batch

    def _assign_documents(self) -> None:
        free_rows = [row for row, document in enumerate(self._row_documents) if document == _FREE]
        if self.mode == "static" and len(free_rows) < self.batch_size:
            return  # the group in progress has not ended yet: free rows stay idle
        for row in free_rows:
            if self._next_document == len(self._order):
                return
            self._row_documents[row] = int(self._order[self._next_document])
            self._next_document += 1

    def _settings(self) -> dict[str, Any]:
        # A saved position only means something for the same corpus and the same batching settings.
        return {
            "corpus_fingerprint": self.corpus.fingerprint,
            "mode": self.mode,
            "batch_size": self.batch_size,
            "train_ctx": self.train_ctx,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the data, as plain JSON-serialisable values."""
        return {
            **self._settings(),
            "epoch": self.epoch,
            "next_document": self._next_document,
            "row_documents": list(self._row_documents),
            "row_positions": list(self._row_positions),
            "targets_done": self._targets_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the batcher that saved `state` stopped."""
        for setting, value in self._settings().items():
            if state[setting] != value:
                raise UserError(
                    f"The saved data position was made with a different {setting}; "
                    "resume with the same corpus and batching settings."
                )
        self._start_epoch(state["epoch"])
        self._next_document = state["next_document"]
        self._row_documents = list(state["row_documents"])
        self._row_positions = list(state["row_positions"])
        self._targets_done = state["targets_done"]
