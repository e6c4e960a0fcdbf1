"""The results database: one SQLite row per benchmark measurement, upgraded in place when the schema grows."""

from __future__ import annotations

import json
import math
import operator
import os
import sqlite3
import typing
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bakallm import __version__
from bakallm.atomic import no_room_reason, reporting_no_room
from bakallm.errors import UserError

DB_PATH_ENV = "BAKALLM_RESULTS_DB"
MODEL_KINDS = ("bakallm", "hf")
# lm: the loss of every token of the articles; recall: answers to queries about facts read earlier (`bench --task recall`).
TASKS = ("lm", "recall")

# Each entry upgrades the schema by one version; `PRAGMA user_version` counts the entries applied.
# Never edit an entry that has been released: append a new one, so existing databases can follow.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # Version 1: the measurement and the model it was taken on.
    (
        """
        CREATE TABLE results (
            id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids never come back, the listing marker relies on it
            created_at TEXT NOT NULL,
            model_kind TEXT NOT NULL,
            model_name TEXT NOT NULL,
            checkpoint_path TEXT,
            checkpoint_hash TEXT,
            params_total INTEGER,
            params_embedding INTEGER,
            benchmark TEXT NOT NULL,
            split TEXT NOT NULL,
            n_ctx INTEGER NOT NULL,
            stride INTEGER,
            tokenizer TEXT,
            tokens INTEGER NOT NULL,
            loss REAL,
            ppl REAL,
            bpb REAL,
            word_ppl REAL,
            legacy_loss REAL,
            nan_count INTEGER NOT NULL DEFAULT 0,
            tokens_per_s REAL,
            peak_memory_bytes INTEGER,
            note TEXT NOT NULL DEFAULT ''
        )
        """,
        "CREATE INDEX results_by_benchmark ON results (benchmark, split)",
    ),
    # Version 2: provenance of each row, and the marker of the previous listing.
    (
        "ALTER TABLE results ADD COLUMN arch_hash TEXT",
        "ALTER TABLE results ADD COLUMN version TEXT",
        "ALTER TABLE results ADD COLUMN extra TEXT NOT NULL DEFAULT '{}'",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # Version 3: the ablation study a row belongs to (`bakallm ablate`).
    (
        "ALTER TABLE results ADD COLUMN study TEXT",
        "CREATE INDEX results_by_study ON results (study)",
    ),
    # Version 4: the loss by position in the article (JSON list of buckets), for the context-use figures.
    ("ALTER TABLE results ADD COLUMN position_losses TEXT",),
    # Version 5: what was measured (language modelling, or recall of planted facts with its figures by distance).
    (
        "ALTER TABLE results ADD COLUMN task TEXT NOT NULL DEFAULT 'lm'",
        "ALTER TABLE results ADD COLUMN recall TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

LAST_LISTED_KEY = "last_listed_id"


@dataclass
class ResultRow:
    """One benchmark measurement of one model at one context length."""

    model_kind: str  # 'bakallm' (our checkpoint) or 'hf' (a Hugging Face model)
    model_name: str
    benchmark: str  # e.g. 'wikitext-103', or the data spec that was scored
    split: str
    n_ctx: int
    tokens: int  # tokens scored
    loss: float  # mean cross-entropy in nats per token
    ppl: float
    bpb: float | None = None
    checkpoint_path: str | None = None
    checkpoint_hash: str | None = None
    params_total: int | None = None
    params_embedding: int | None = None
    stride: int | None = None
    tokenizer: str | None = None
    word_ppl: float | None = None
    legacy_loss: float | None = None
    nan_count: int = 0
    tokens_per_s: float | None = None
    peak_memory_bytes: int | None = None
    note: str = ""
    arch_hash: str | None = None
    version: str | None = __version__  # None on rows recorded before the database stored it
    extra: dict[str, Any] = field(default_factory=dict)
    study: str | None = None  # the `bakallm ablate` study that recorded the row
    # One {"start", "stop", "tokens", "loss"} per position bucket (stop None: open-ended); None on older rows.
    position_losses: list[dict[str, Any]] | None = None
    task: str = "lm"
    # For task recall: one RecallScore dict per distance (bakallm.evaluation.recall); loss, ppl and
    # tokens are then those of the answer tokens.
    recall: list[dict[str, Any]] | None = None
    id: int | None = None  # assigned by the database
    created_at: str | None = None  # UTC ISO time, assigned by the database

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise ValueError(f"ResultRow.model_kind must be one of {MODEL_KINDS}, got {self.model_kind!r}.")
        if self.task not in TASKS:
            raise ValueError(f"ResultRow.task must be one of {TASKS}, got {self.task!r}.")
        # Benchmarks hand over numpy and torch scalars, which SQLite cannot store: keep plain Python numbers.
        for name, convert in _NUMBER_CONVERTERS.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, convert(value))


def _number_converters() -> dict[str, Any]:
    converters: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(ResultRow).items():
        kinds = set(typing.get_args(hint)) or {hint}
        if int in kinds:
            converters[name] = operator.index  # refuses 3.7 where an integer is due, instead of truncating it
        elif float in kinds:
            converters[name] = float
    return converters


_NUMBER_CONVERTERS = _number_converters()

# Column order of a full listing: identity first, then the fields as the dataclass declares them.
ALL_COLUMNS: tuple[str, ...] = ("id", "created_at") + tuple(
    f.name for f in fields(ResultRow) if f.name not in ("id", "created_at")
)
# Fields stored as JSON text.
JSON_LIST_COLUMNS = ("position_losses", "recall")
# SQLite stores NaN as NULL; these measurements are always written, so NULL can only mean NaN.
_NAN_WHEN_NULL = ("loss", "ppl")


def default_db_path() -> Path:
    """`$BAKALLM_RESULTS_DB`, or `results/results.sqlite3` under the current directory."""
    configured = os.environ.get(DB_PATH_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.cwd() / "results" / "results.sqlite3"


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsDB:
    """The results database at `path` (default: `default_db_path()`), created and upgraded on opening."""

    def __init__(self, path: str | Path | None = None, *, must_exist: bool = False):
        self.path = Path(path).expanduser() if path is not None else default_db_path()
        if not self.path.exists():
            if must_exist:
                raise UserError(
                    f"there are no results yet at {self.path}: record some with `bakallm bench`, "
                    f"or point --db or ${DB_PATH_ENV} at an existing results database."
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = None
        try:
            # Autocommit: every statement commits by itself, migrations open their own transaction.
            # The timeout lets several benchmark processes write to one database.
            connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            connection.row_factory = sqlite3.Row
            _upgrade(connection, self.path)
        except BaseException as error:
            if connection is not None:
                connection.close()
            if isinstance(error, sqlite3.DatabaseError) and no_room_reason(error) is not None:
                raise UserError(
                    f"Could not write {self.path}: {no_room_reason(error)}; free some space and run the same command again."
                ) from None
            if isinstance(error, sqlite3.DatabaseError):
                raise UserError(
                    f"{self.path} is not a readable results database ({error}): pass --db with the right file."
                ) from error
            raise
        self._connection = connection

    # ----- rows -----
    def add(self, row: ResultRow) -> int:
        """Insert `row` (its `id` is ignored, `created_at` defaults to now) and return the new row's id."""
        values = asdict(row)
        del values["id"]
        values["created_at"] = row.created_at or utc_now_iso()
        values["extra"] = json.dumps(row.extra, sort_keys=True)
        for name in JSON_LIST_COLUMNS:
            if values[name] is not None:
                values[name] = json.dumps(values[name], sort_keys=True)
        names = ", ".join(values)
        placeholders = ", ".join(f":{name}" for name in values)
        with reporting_no_room(
            f"add a row to {self.path}",
            "the rows stored before are unchanged; free some space and run the same command again",
        ):
            cursor = self._connection.execute(f"INSERT INTO results ({names}) VALUES ({placeholders})", values)
        return int(cursor.lastrowid)

    def rows(
        self,
        benchmark: str | None = None,
        split: str | None = None,
        since_id: int | None = None,
        study: str | None = None,
        task: str | None = None,
    ) -> list[ResultRow]:
        """Rows in insertion order, optionally only those of a benchmark, a split, a study, a task, or with an id above `since_id`."""
        conditions, parameters = [], []
        filters = (
            ("benchmark = ?", benchmark),
            ("split = ?", split),
            ("id > ?", since_id),
            ("study = ?", study),
            ("task = ?", task),
        )
        for condition, value in filters:
            if value is not None:
                conditions.append(condition)
                parameters.append(value)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        records = self._connection.execute(f"SELECT * FROM results {where} ORDER BY id", parameters).fetchall()
        return [_row_from_record(record) for record in records]

    # ----- listing marker -----
    def last_listed_id(self) -> int:
        """The newest row id shown by the previous listing, 0 before the first one."""
        record = self._connection.execute("SELECT value FROM meta WHERE key = ?", (LAST_LISTED_KEY,)).fetchone()
        return int(record["value"]) if record else 0

    def mark_listed(self, row_id: int) -> None:
        """Remember that rows up to `row_id` have been shown; the marker never moves back."""
        self._connection.execute(
            "INSERT INTO meta (key, value) VALUES (:key, :value) "
            "ON CONFLICT (key) DO UPDATE SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
            {"key": LAST_LISTED_KEY, "value": str(row_id)},
        )

    # ----- lifetime -----
    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> "ResultsDB":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _upgrade(connection: sqlite3.Connection, path: Path) -> None:
    """Apply the migrations the database at `path` lacks, all in one transaction."""
    if connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return  # up to date: no write lock, so opening never waits for a benchmark that is writing
    with connection:  # commits, or rolls back on any error
        # IMMEDIATE takes the write lock first, so two processes opening an old database upgrade it once.
        connection.execute("BEGIN IMMEDIATE")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise UserError(
                f"{path} has results schema version {version}, newer than this bakallm {__version__} "
                f"understands ({SCHEMA_VERSION}): upgrade bakallm."
            )
        if version == 0 and connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise UserError(
                f"{path} is an SQLite database of something else, not of bakallm results: pass --db with the right file."
            )
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {number}")


def _row_from_record(record: sqlite3.Row) -> ResultRow:
    values = {name: record[name] for name in record.keys()}
    values["extra"] = json.loads(values["extra"])
    for name in JSON_LIST_COLUMNS:
        if values[name] is not None:
            values[name] = json.loads(values[name])
    for name in _NAN_WHEN_NULL:
        if values[name] is None:
            values[name] = math.nan
    return ResultRow(**values)
