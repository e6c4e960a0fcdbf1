"""Position buckets: the loss of scored tokens grouped by how far into their article they sit.

Kept free of torch, so that `bakallm results` and `bakallm plot` can read them without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bakallm.errors import UserError

# Where the default position buckets of the context-use figures begin: 0-512, 512-2K, 2K-8K, 8K and beyond.
DEFAULT_POSITION_BUCKETS: tuple[int, ...] = (0, 512, 2048, 8192)


@dataclass(frozen=True)
class PositionLoss:
    """The loss of the scored tokens whose input sits at a position in [start, stop) of its article.

    A token predicted from the t + 1 tokens at positions 0..t counts at position t, so the first
    window of 512 inputs is exactly the bucket [0, 512), whatever the context length.
    """

    start: int
    stop: int | None  # None: no upper end
    tokens: int  # finite-loss tokens in the bucket
    loss: float  # their mean NLL in nats; NaN for an empty bucket

    @property
    def label(self) -> str:
        return position_label(self.start, self.stop)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "stop": self.stop,
            "tokens": self.tokens,
            "loss": None if math.isnan(self.loss) else self.loss,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PositionLoss":
        loss = values["loss"]
        return cls(
            int(values["start"]), values["stop"], int(values["tokens"]), math.nan if loss is None else float(loss)
        )


def position_label(start: int, stop: int | None) -> str:
    """(512, 2048) -> '512-2K', (8192, None) -> '8K+'."""
    return f"{count_label(start)}+" if stop is None else f"{count_label(start)}-{count_label(stop)}"


def count_label(count: int) -> str:
    """1024 -> '1K', 1048576 -> '1M', 2**40 (an ablation's whole document) -> '1T', 1536 -> '1536'."""
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if count >= size and count % size == 0:
            return f"{count // size}{unit}"
    return str(count)


def check_position_buckets(starts: Sequence[int]) -> tuple[int, ...]:
    """The bucket starts, refused unless they begin at 0 and rise strictly."""
    starts = tuple(int(start) for start in starts)
    if not starts or starts[0] != 0 or any(later <= earlier for earlier, later in zip(starts, starts[1:])):
        raise UserError(
            f"Position buckets must start at 0 and rise strictly, got {', '.join(map(str, starts)) or 'none'}; "
            "write e.g. --position-buckets 0,512,2048,8192."
        )
    return starts
