"""The results table as Markdown (for people), CSV or JSON (for programs)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from bakallm.errors import UserError
from bakallm.results.db import ALL_COLUMNS, ResultRow

DEFAULT_COLUMNS: tuple[str, ...] = ("model_name", "benchmark", "split", "n_ctx", "loss", "ppl", "bpb", "note")
FORMATS = ("markdown", "csv", "json")
# Decimals shown in Markdown; CSV and JSON keep full precision because programs read them.
MARKDOWN_FLOAT_FORMATS = {
    "loss": ".4f",
    "legacy_loss": ".4f",
    "bpb": ".4f",
    "ppl": ".2f",
    "word_ppl": ".2f",
    "tokens_per_s": ".1f",
}


def parse_columns(text: str) -> tuple[str, ...]:
    """`'model_name, n_ctx,loss'` -> `('model_name', 'n_ctx', 'loss')`, refusing names that are not row fields."""
    columns = tuple(name.strip() for name in text.split(",") if name.strip())
    if not columns:
        raise UserError("--columns is empty: give comma-separated column names, e.g. --columns model_name,n_ctx,loss.")
    _check_columns(columns)
    return columns


def _check_columns(columns: Sequence[str]) -> None:
    unknown = [name for name in columns if name not in ALL_COLUMNS]
    if unknown:
        raise UserError(f"unknown column(s) {', '.join(unknown)}: choose among {', '.join(ALL_COLUMNS)}.")


def format_table(
    rows: Iterable[ResultRow],
    columns: Sequence[str] | None = None,
    fmt: str = "markdown",
    bold_ids: Collection[int] = frozenset(),
) -> str:
    """The rows sorted by loss (best first) with the chosen columns; Markdown rows whose id is in `bold_ids` are bold."""
    columns = tuple(columns) if columns is not None else DEFAULT_COLUMNS
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    _check_columns(columns)
    ordered = sorted(rows, key=_loss_order)
    if fmt == "markdown":
        return _markdown(ordered, columns, bold_ids)
    if fmt == "csv":
        return _csv(ordered, columns)
    objects = [{name: json_value(getattr(row, name)) for name in columns} for row in ordered]
    return json.dumps(objects, indent=2) + "\n"


def _loss_order(row: ResultRow) -> tuple[bool, float, int]:
    # NaN losses (diverged runs) sort last instead of landing anywhere; ties keep insertion order.
    return (math.isnan(row.loss), row.loss, row.id or 0)


def _markdown(rows: Sequence[ResultRow], columns: Sequence[str], bold_ids: Collection[int]) -> str:
    lines = [_markdown_line(columns), "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_markdown_cell(name, getattr(row, name)) for name in columns]
        if row.id in bold_ids:
            cells = [f"**{cell}**" if cell else cell for cell in cells]  # '****' would render as a stray rule
        lines.append(_markdown_line(cells))
    return "\n".join(lines) + "\n"


def _markdown_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _markdown_cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and name in MARKDOWN_FLOAT_FORMATS:
        text = format(value, MARKDOWN_FLOAT_FORMATS[name])
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    # A pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _csv(rows: Sequence[ResultRow], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(getattr(row, name)) for name in columns])
    return buffer.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def json_value(value: Any) -> Any:
    # JSON has no NaN; a diverged run's loss becomes null rather than output that strict parsers reject.
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def study_table(rows: Iterable[ResultRow], fmt: str = "markdown") -> str:
    """One line per variant of an ablation study, in the order the study ran them: parameters,
    training tokens and time, then the loss on each held-out corpus at each context and its
    difference to the first variant (negative: better than the first)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    variants: dict[str, dict[str, Any]] = {}
    figures: list[str] = []
    # The study file's order (processes that share a study record out of order), else the order recorded.
    rows = sorted(rows, key=lambda row: row.extra.get("variant_index", 0))
    for row in rows:
        variant = variants.setdefault(
            row.extra.get("variant", row.model_name),
            {
                "params": row.params_total,
                "train_tokens": row.extra.get("train_tokens"),
                "train_s": row.extra.get("train_seconds"),
            },
        )
        figure = f"{row.benchmark} @{row.extra.get('context', row.n_ctx)}"
        if figure not in figures:
            figures.append(figure)
        variant[figure] = row.loss  # a rerun of a variant replaces its earlier figure
    first = next(iter(variants.values()), {})
    records = []
    for name, values in variants.items():
        record: dict[str, Any] = {
            "variant": name,
            "params": values["params"],
            "train_tokens": values["train_tokens"],
            "train_s": values["train_s"],
        }
        for figure in figures:
            loss, reference = values.get(figure), first.get(figure)
            record[figure] = loss
            record[f"{figure} delta"] = loss - reference if loss is not None and reference is not None else None
        records.append(record)
    if fmt == "json":
        return (
            json.dumps([{key: json_value(value) for key, value in record.items()} for record in records], indent=2)
            + "\n"
        )
    if fmt == "csv":
        return _records_csv(records, ["variant"])
    header = ["variant", "params", "train tokens", "train min", *[f"loss {figure} (delta)" for figure in figures]]
    lines = [_markdown_line(header), "|---|" + "---:|" * (len(header) - 1)]
    for record in records:
        cells = [
            record["variant"],
            _count(record["params"]),
            _count(record["train_tokens"]),
            "" if record["train_s"] is None else f"{record['train_s'] / 60:.1f}",
        ]
        for figure in figures:
            loss, delta = record[figure], record[f"{figure} delta"]
            cells.append("" if loss is None else f"{loss:.4f} ({delta:+.4f})")
        lines.append(_markdown_line(cells))
    return "\n".join(lines) + "\n"


def _records_csv(records: Sequence[dict[str, Any]], empty_columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = list(records[0]) if records else empty_columns
    writer.writerow(columns)
    for record in records:
        writer.writerow([_csv_cell(record[column]) for column in columns])
    return buffer.getvalue()


def _count(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def format_recall_scores(row: ResultRow) -> str:
    """One recall measurement, a line per distance, as `bakallm bench --task recall` prints it."""
    window = row.extra.get("window")
    lines = [
        f"{row.model_name}: recall of a fact read N windows{f' of {window} tokens' if window else ''} before its query "
        f"({row.benchmark} filler, n_ctx {row.n_ctx}{', document cache kept across resets' if row.extra.get('keep_document_cache') else ''})",
        _markdown_line(["distance (windows)", "tokens", "exact answers", "first token", "answer loss", "samples"]),
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for score in row.recall or []:
        lines.append(
            _markdown_line(
                [
                    f"{score['distance_windows']:g}",
                    f"{score['distance_tokens']:,}",
                    f"{score['accuracy']:.1%}",
                    f"{score['first_token_accuracy']:.1%}",
                    f"{score['answer_loss']:.3f}",
                    str(score["samples"]),
                ]
            )
        )
    if row.recall:
        lines.append(
            f"chance: exact {row.recall[0]['chance']:.3%}, first token {row.recall[0]['first_token_chance']:.1%}"
        )
    return "\n".join(lines) + "\n"


def recall_table(rows: Iterable[ResultRow], fmt: str = "markdown") -> str:
    """Recall rows, one line each in the order recorded: exact-match accuracy (and the first token's)
    at every distance any of them measured, in windows."""
    if fmt not in FORMATS:
        raise UserError(f"unknown table format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    rows = list(rows)
    distances = sorted({score["distance_windows"] for row in rows for score in row.recall or []})
    records = []
    for row in rows:
        record: dict[str, Any] = {
            "id": row.id,
            "model_name": row.model_name,
            "benchmark": row.benchmark,
            "n_ctx": row.n_ctx,
            "window": row.extra.get("window"),
            "note": row.note,
        }
        by_distance = {score["distance_windows"]: score for score in row.recall or []}
        for distance in distances:
            score = by_distance.get(distance)
            record[f"exact@{distance:g}"] = score["accuracy"] if score else None
            record[f"first@{distance:g}"] = score["first_token_accuracy"] if score else None
        records.append(record)
    if fmt == "json":
        return (
            json.dumps([{key: json_value(value) for key, value in record.items()} for record in records], indent=2)
            + "\n"
        )
    if fmt == "csv":
        return _records_csv(records, ["id"])
    header = ["id", "model", "filler", "n_ctx", "window", *[f"{distance:g} w" for distance in distances], "note"]
    lines = [_markdown_line(header), "|" + "---|" * 5 + "---:|" * len(distances) + "---|"]
    for record in records:
        cells = [
            str(record["id"]),
            record["model_name"],
            record["benchmark"],
            str(record["n_ctx"]),
            str(record["window"] or ""),
        ]
        for distance in distances:
            exact, first = record[f"exact@{distance:g}"], record[f"first@{distance:g}"]
            cells.append("" if exact is None else f"{exact:.0%} ({first:.0%})")
        cells.append(record["note"])
        lines.append(_markdown_line([cell.replace("|", "\\|") for cell in cells]))
    return "\n".join(lines) + "\n"
