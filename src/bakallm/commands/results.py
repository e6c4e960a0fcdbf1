"""`bakallm results`: print the results table, with rows added since the previous listing in bold."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

from bakallm.commands import options
from bakallm.errors import UserError
from bakallm.results.context_use import context_uses, format_context_gains, format_context_use
from bakallm.results.db import ALL_COLUMNS, TASKS, ResultRow, ResultsDB, default_db_path
from bakallm.results.table import DEFAULT_COLUMNS, FORMATS, format_table, parse_columns, recall_table, study_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.add_db(parser)
    parser.add_argument("--benchmark", help="only rows of this benchmark, e.g. wikitext-103")
    parser.add_argument("--split", help="only rows of this split, e.g. test")
    parser.add_argument(
        "--task",
        choices=TASKS,
        help="only rows of this task: lm (language modelling) or recall (`bench --task recall`); default: both as Markdown, lm as CSV or JSON",
    )
    parser.add_argument(
        "--study", help="the table of this `bakallm ablate` study: one line per variant, with deltas to the first"
    )
    parser.add_argument("--format", choices=FORMATS, default="markdown", help="output format (default: markdown)")
    columns = parser.add_mutually_exclusive_group()
    columns.add_argument("--columns", help=f"comma-separated columns (default: {','.join(DEFAULT_COLUMNS)})")
    columns.add_argument("--all-columns", action="store_true", help="show every column")
    parser.add_argument(
        "--context-use",
        action="store_true",
        help="instead of the table: the loss by position in the article of each model at each context length it was "
        "benchmarked with, and how much lower the longest context's loss is than the shortest's",
    )
    parser.add_argument(
        "--since",
        help="bold the rows with this id or newer, or added at or after this ISO date/time "
        "(default: the rows added since the previous Markdown listing)",
    )


def run(args: argparse.Namespace) -> int:
    if args.all_columns:
        columns = ALL_COLUMNS
    elif args.columns is not None:
        columns = parse_columns(args.columns)
    else:
        columns = DEFAULT_COLUMNS
    path = args.db if args.db is not None else default_db_path()
    # CSV and JSON are read by programs: one table, the language-modelling one unless --task says otherwise.
    shown_tasks = [args.task] if args.task is not None else (list(TASKS) if args.format == "markdown" else ["lm"])
    if args.study is not None:
        with ResultsDB(path, must_exist=True) as db:
            rows = [
                row
                for row in db.rows(benchmark=args.benchmark, split=args.split, study=args.study)
                if row.task in shown_tasks
            ]
        if not rows:
            raise UserError(
                f"no results of study {args.study!r} in {path}; run `bakallm ablate` on its study file first."
            )
        lm_rows, recall_rows = _by_task(rows)
        if args.context_use:
            table = format_context_gains(
                context_uses(sorted(lm_rows, key=lambda row: row.extra.get("variant_index", 0)))
            )  # the study file's order
            print(
                table or f"no variant of study {args.study!r} has two contexts with position losses to compare.\n",
                end="",
            )
            return 0
        print(_tables(study_table(lm_rows, fmt=args.format) if lm_rows else None, recall_rows, args.format), end="")
        return 0
    with ResultsDB(path, must_exist=True) as db:
        rows = [row for row in db.rows(benchmark=args.benchmark, split=args.split) if row.task in shown_tasks]
        if not rows:
            print(f"no results in {db.path}{_filter_description(args)}.")
            return 0
        lm_rows, recall_rows = _by_task(rows)
        if args.context_use:
            uses = context_uses(lm_rows)
            if not uses:
                print(
                    f"no results with position losses in {db.path}{_filter_description(args)}: record some with `bakallm bench --reset-every 512`."
                )
                return 0
            print(format_context_use(uses), end="")
            return 0
        if args.since is not None:
            bold_ids = _ids_since(rows, args.since)
        else:
            previous = db.last_listed_id()
            bold_ids = {row.id for row in rows if row.id > previous}
        print(
            _tables(
                format_table(lm_rows, columns, fmt=args.format, bold_ids=bold_ids) if lm_rows else None,
                recall_rows,
                args.format,
            ),
            end="",
        )
        # Only the Markdown table is read by a person; a script exporting CSV or JSON must not use up the marker.
        if args.format == "markdown":
            db.mark_listed(max(row.id for row in rows))
    return 0


def _by_task(rows: list[ResultRow]) -> tuple[list[ResultRow], list[ResultRow]]:
    return [row for row in rows if row.task == "lm"], [row for row in rows if row.task == "recall"]


def _tables(lm_table: str | None, recall_rows: list[ResultRow], fmt: str) -> str:
    """The language-modelling table, then the recall table (in Markdown under a heading of its own)."""
    tables = [lm_table] if lm_table is not None else []
    if recall_rows:
        heading = (
            "Recall: exact answers (first token) by distance between fact and query, in windows\n\n"
            if fmt == "markdown"
            else ""
        )
        tables.append(heading + recall_table(recall_rows, fmt=fmt))
    return "\n".join(tables)


def _filter_description(args: argparse.Namespace) -> str:
    parts = [
        f"{name} {value}" for name, value in (("benchmark", args.benchmark), ("split", args.split)) if value is not None
    ]
    return f" for {', '.join(parts)}" if parts else ""


def _ids_since(rows: list[ResultRow], since: str) -> set[int]:
    """Ids of the rows at or after `since`: a row id, or an ISO date/time (UTC unless it names a zone)."""
    if since.strip().isdigit():
        first_id = int(since)
        return {row.id for row in rows if row.id >= first_id}
    try:
        moment = datetime.fromisoformat(since.strip())
    except ValueError:
        raise UserError(
            f"--since {since!r} is neither a row id nor an ISO date/time: write e.g. --since 42 or --since 2025-01-31T18:00."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return {row.id for row in rows if datetime.fromisoformat(row.created_at) >= moment}
