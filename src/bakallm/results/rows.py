"""The one way a measurement becomes a result row, for `bakallm bench` and `bakallm ablate` alike."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bakallm.results.db import ResultRow

if TYPE_CHECKING:
    from bakallm.evaluation.tally import EvalResult


@dataclass(frozen=True)
class ModelRecord:
    """What every row records of the model it measured."""

    kind: str  # a ResultRow.model_kind
    name: str
    checkpoint_path: str | None
    checkpoint_hash: str | None
    params_total: int
    params_embedding: int
    arch_hash: str


def sha256_files(paths: list[Path]) -> str | None:
    """One hash of the files' contents, in the order given; None for no files."""
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def lm_figures(result: EvalResult) -> dict[str, Any]:
    """The row fields of a language-modelling result."""
    return {
        "tokens": result.tokens,
        "loss": result.loss,
        "ppl": result.ppl,
        "bpb": result.bpb,
        "word_ppl": result.word_ppl,
        "legacy_loss": result.legacy_loss,
        "nan_count": result.nan_count,
        "tokens_per_s": result.tokens_per_s,
        "peak_memory_bytes": result.peak_memory_bytes,
        "position_losses": [bucket.to_dict() for bucket in result.position_losses],
    }


def result_row(
    model: ModelRecord,
    benchmark: str,
    split: str,
    n_ctx: int,
    stride: int | None,
    tokenizer: str,
    figures: dict[str, Any],
    extra: dict[str, Any],
    note: str = "",
    study: str | None = None,
) -> ResultRow:
    """The row of one measurement: what was measured (`figures`: the measured fields, from
    `lm_figures` or bakallm.evaluation.recall.recall_figures) of which model, and how."""
    return ResultRow(
        model_kind=model.kind,
        model_name=model.name,
        benchmark=benchmark,
        split=split,
        n_ctx=n_ctx,
        stride=stride,
        checkpoint_path=model.checkpoint_path,
        checkpoint_hash=model.checkpoint_hash,
        params_total=model.params_total,
        params_embedding=model.params_embedding,
        arch_hash=model.arch_hash,
        tokenizer=tokenizer,
        note=note,
        study=study,
        extra=extra,
        **figures,
    )
