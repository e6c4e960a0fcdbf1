"""The context-use table: the loss by position in the article of one model read with different context lengths.

Two rows of the same checkpoint on the same benchmark, one whole-article (large n_ctx) and one reset
every N tokens, score the same tokens; their losses bucket by bucket show whether, and how far into
an article, the carried state lowers the loss.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bakallm.evaluation.positions import PositionLoss, count_label
from bakallm.results.db import ResultRow


@dataclass(frozen=True)
class ContextUse:
    """One model on one benchmark: its position losses at each context length measured (newest row per n_ctx)."""

    model_name: str
    benchmark: str
    split: str
    losses_by_n_ctx: dict[int, tuple[PositionLoss, ...]]  # ascending n_ctx
    loss_by_n_ctx: dict[int, float]  # the row's overall loss

    @property
    def shortest(self) -> int:
        return min(self.losses_by_n_ctx)

    @property
    def longest(self) -> int:
        return max(self.losses_by_n_ctx)


def relative_gain(reference: float, loss: float) -> float:
    """How much lower `loss` is than `reference`, as a fraction of `reference` (negative: higher)."""
    return (reference - loss) / reference if reference and not math.isnan(reference) else math.nan


def context_uses(rows: Iterable[ResultRow]) -> list[ContextUse]:
    """The rows with position losses, grouped by checkpoint and benchmark, in order of first appearance.

    Only rows whose buckets agree with the group's newest row are kept, so every column covers the same positions.
    """
    groups: dict[tuple, dict[int, ResultRow]] = {}
    for row in rows:  # id order: a newer row at the same n_ctx replaces the older one
        if row.position_losses:
            key = (
                row.model_name,
                row.checkpoint_hash,
                row.model_kind,
                row.stride is not None,
                row.benchmark,
                row.split,
            )
            groups.setdefault(key, {})[row.n_ctx] = row
    uses = []
    for (model_name, _, _, _, benchmark, split), by_n_ctx in groups.items():
        newest = max(by_n_ctx.values(), key=lambda row: row.id or 0)
        spans = _spans(newest)
        kept = {n_ctx: row for n_ctx, row in sorted(by_n_ctx.items()) if _spans(row) == spans}
        uses.append(
            ContextUse(
                model_name,
                benchmark,
                split,
                {
                    n_ctx: tuple(PositionLoss.from_dict(bucket) for bucket in row.position_losses)
                    for n_ctx, row in kept.items()
                },
                {n_ctx: row.loss for n_ctx, row in kept.items()},
            )
        )
    return uses


def _spans(row: ResultRow) -> tuple:
    return tuple((bucket["start"], bucket["stop"]) for bucket in row.position_losses)


def format_context_use(uses: Sequence[ContextUse]) -> str:
    """One Markdown table per model and benchmark: loss by position at each n_ctx, and the gain of the longest over the shortest."""
    blocks = []
    for use in uses:
        contexts = list(use.losses_by_n_ctx)
        header = ["position", "tokens"] + [f"loss n_ctx {count_label(n_ctx)}" for n_ctx in contexts]
        compare = len(contexts) > 1
        if compare:
            header.append(f"{count_label(use.longest)} vs {count_label(use.shortest)}")
        lines = [
            f"{use.model_name} on {use.benchmark}/{use.split}:",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        buckets = use.losses_by_n_ctx[use.longest]
        for index, bucket in enumerate(buckets):
            losses = [use.losses_by_n_ctx[n_ctx][index].loss for n_ctx in contexts]
            cells = [bucket.label, f"{bucket.tokens:,}"] + [_loss_cell(loss) for loss in losses]
            if compare:
                cells.append(_gain_cell(relative_gain(losses[0], losses[-1])))
            lines.append("| " + " | ".join(cells) + " |")
        totals = [use.loss_by_n_ctx[n_ctx] for n_ctx in contexts]
        cells = ["all", f"{sum(bucket.tokens for bucket in buckets):,}"] + [_loss_cell(loss) for loss in totals]
        if compare:
            cells.append(_gain_cell(relative_gain(totals[0], totals[-1])))
        lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def format_context_gains(uses: Sequence[ContextUse]) -> str:
    """One Markdown line per model and benchmark (e.g. the variants of a study): the longest context's
    loss against the shortest's overall, and how much lower it is in each position bucket."""
    uses = [use for use in uses if len(use.losses_by_n_ctx) > 1]
    if not uses:
        return ""
    buckets = uses[0].losses_by_n_ctx[uses[0].longest]
    header = [
        "model",
        "benchmark",
        "contexts",
        "loss (longest)",
        "loss (shortest)",
        *[f"gain {bucket.label}" for bucket in buckets],
        "gain all",
    ]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for use in uses:
        longest, shortest = use.losses_by_n_ctx[use.longest], use.losses_by_n_ctx[use.shortest]
        gains = [relative_gain(short.loss, long.loss) for short, long in zip(shortest, longest)]
        if [bucket.label for bucket in longest] != [bucket.label for bucket in buckets]:
            gains = [math.nan] * len(buckets)  # other buckets than the first model's: no column fits
        overall = relative_gain(use.loss_by_n_ctx[use.shortest], use.loss_by_n_ctx[use.longest])
        cells = [
            use.model_name,
            use.benchmark,
            f"{count_label(use.longest)} vs {count_label(use.shortest)}",
            _loss_cell(use.loss_by_n_ctx[use.longest]),
            _loss_cell(use.loss_by_n_ctx[use.shortest]),
            *[_percent_cell(gain) for gain in gains],
            _percent_cell(overall),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent_cell(gain: float) -> str:
    return "" if math.isnan(gain) else f"{100 * gain:+.2f}%"


def _loss_cell(loss: float) -> str:
    return "" if math.isnan(loss) else f"{loss:.4f}"


def _gain_cell(gain: float) -> str:
    return "" if math.isnan(gain) else f"{100 * gain:.2f}% lower" if gain >= 0 else f"{100 * -gain:.2f}% higher"
