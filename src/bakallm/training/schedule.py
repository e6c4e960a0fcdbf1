"""The learning-rate schedule of a run: fixed when the run starts, saved with every checkpoint.

A schedule is a list of segments. The first starts at step 0: linear warm-up from 0 to the peak
over `warmup_steps`, then the decay (`constant`, `cosine` or `linear`) down to
`min_lr_ratio * lr` at its end step, where the learning rate then stays. A resume never moves
that end: a run continued past it holds the final learning rate. Only an explicit new decay
(`bakallm train --resume RUN --new-decay`) appends a segment: warm-up from the learning rate the
run had reached back to the peak, then the decay to the floor at the new end of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SCHEDULES = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class Segment:
    first_step: int
    end_step: int  # the step at which the decay reaches the floor
    start_lr: float  # where the warm-up starts


@dataclass(frozen=True)
class Schedule:
    kind: str
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    segments: tuple[Segment, ...] = field(default_factory=tuple)

    @classmethod
    def planned(cls, kind: str, lr: float, min_lr_ratio: float, warmup_steps: int, decay_steps: int) -> Schedule:
        return cls(kind, lr, min_lr_ratio, warmup_steps, (Segment(0, decay_steps, 0.0),))

    def learning_rate(self, step: int) -> float:
        segment = next(segment for segment in reversed(self.segments) if segment.first_step <= step)
        position = step - segment.first_step
        if position < self.warmup_steps:
            return segment.start_lr + (self.lr - segment.start_lr) * (position + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        length = segment.end_step - segment.first_step
        progress = min(1.0, (position - self.warmup_steps) / max(1, length - self.warmup_steps))
        floor = self.min_lr_ratio
        if self.kind == "cosine":
            return self.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.lr * (1 - (1 - floor) * progress)

    @property
    def end_step(self) -> int:
        return self.segments[-1].end_step

    def with_new_decay(self, first_step: int, end_step: int) -> Schedule:
        """This schedule up to `first_step`, then a warm-up from the rate reached there and a decay ending at `end_step`."""
        reached = self.learning_rate(first_step - 1) if first_step else 0.0
        kept = tuple(segment for segment in self.segments if segment.first_step < first_step)
        return Schedule(
            self.kind, self.lr, self.min_lr_ratio, self.warmup_steps, kept + (Segment(first_step, end_step, reached),)
        )

    def segments_as_lists(self) -> list[list[float]]:
        """The segments as JSON values, for the trainer state of a checkpoint."""
        return [[segment.first_step, segment.end_step, segment.start_lr] for segment in self.segments]

    def with_segments(self, saved: list[list[float]]) -> Schedule:
        return Schedule(
            self.kind,
            self.lr,
            self.min_lr_ratio,
            self.warmup_steps,
            tuple(Segment(int(a), int(b), float(c)) for a, b, c in saved),
        )
