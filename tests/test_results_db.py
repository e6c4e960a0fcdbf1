import math
import sqlite3

import numpy as np
import pytest

from bakallm import __version__
from bakallm.errors import UserError
from bakallm.results import db as db_module
from bakallm.results.db import DB_PATH_ENV, SCHEMA_VERSION, ResultRow, ResultsDB, default_db_path


def make_row(**changes) -> ResultRow:
    values = dict(
        model_kind="bakallm",
        model_name="tiny",
        benchmark="wikitext-103",
        split="test",
        n_ctx=4096,
        tokens=1000,
        loss=3.5,
        ppl=33.12,
    )
    values.update(changes)
    return ResultRow(**values)


def test_round_trip_keeps_every_value(tmp_path):
    row = make_row(
        bpb=1.0123,
        checkpoint_path="runs/a/checkpoint.pt",
        checkpoint_hash="abc123",
        params_total=123_456_789,
        params_embedding=38_000_000,
        stride=512,
        tokenizer="EleutherAI/gpt-neox-20b",
        word_ppl=45.5,
        legacy_loss=3.6,
        nan_count=2,
        tokens_per_s=1234.5,
        peak_memory_bytes=8 << 30,
        note="after 2 epoch",
        arch_hash="f00d",
        extra={"seed": 3, "data": ["a", "b"]},
    )
    path = tmp_path / "deep" / "folder" / "results.sqlite3"
    with ResultsDB(path) as db:
        row_id = db.add(row)
    assert path.is_file()
    with ResultsDB(path) as db:
        (stored,) = db.rows()
    assert stored.id == row_id == 1
    assert stored.created_at.endswith("+00:00")
    assert stored.version == __version__
    stored.id = stored.created_at = None
    assert stored == row


def test_numpy_scalars_become_python_numbers(tmp_path):
    row = make_row(n_ctx=np.int64(2048), tokens=np.int32(7), loss=np.float32(2.5), ppl=np.float64(12.18))
    assert type(row.n_ctx) is int and type(row.loss) is float
    with ResultsDB(tmp_path / "r.sqlite3") as db:
        db.add(row)
        (stored,) = db.rows()
    assert (stored.n_ctx, stored.tokens, stored.loss, stored.ppl) == (2048, 7, 2.5, 12.18)


def test_integer_fields_refuse_fractions_and_kind_is_checked():
    with pytest.raises(TypeError):
        make_row(n_ctx=1024.5)
    with pytest.raises(ValueError, match="model_kind"):
        make_row(model_kind="gguf")


def test_nan_loss_reads_back_as_nan(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite3") as db:
        db.add(make_row(loss=math.nan, ppl=math.nan, nan_count=1000))
        (stored,) = db.rows()
    assert math.isnan(stored.loss) and math.isnan(stored.ppl) and stored.nan_count == 1000


def test_rows_filter_by_benchmark_split_and_id(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite3") as db:
        db.add(make_row(benchmark="wikitext-103", split="test", n_ctx=1))
        db.add(make_row(benchmark="wikitext-103", split="validation", n_ctx=2))
        db.add(make_row(benchmark="pg19", split="test", n_ctx=3))
        db.add(make_row(benchmark="wikitext-103", split="test", n_ctx=4))
        assert [r.n_ctx for r in db.rows()] == [1, 2, 3, 4]
        assert [r.n_ctx for r in db.rows(benchmark="wikitext-103")] == [1, 2, 4]
        assert [r.n_ctx for r in db.rows(split="test")] == [1, 3, 4]
        assert [r.n_ctx for r in db.rows(benchmark="wikitext-103", split="test")] == [1, 4]
        assert [r.n_ctx for r in db.rows(since_id=2)] == [3, 4]
        assert db.rows(benchmark="lambada") == []


def test_listing_marker_only_moves_forward(tmp_path):
    with ResultsDB(tmp_path / "r.sqlite3") as db:
        assert db.last_listed_id() == 0
        db.mark_listed(5)
        db.mark_listed(3)
        assert db.last_listed_id() == 5
        db.mark_listed(9)
    with ResultsDB(tmp_path / "r.sqlite3") as db:
        assert db.last_listed_id() == 9


def write_version_1_database(path) -> None:
    connection = sqlite3.connect(path)
    # The version 1 layout, written by hand as an old bakallm left it: no arch_hash, version, extra or meta.
    connection.executescript(
        """
        CREATE TABLE results (
            id INTEGER PRIMARY KEY AUTOINCREMENT, created_at TEXT NOT NULL, model_kind TEXT NOT NULL,
            model_name TEXT NOT NULL, checkpoint_path TEXT, checkpoint_hash TEXT, params_total INTEGER,
            params_embedding INTEGER, benchmark TEXT NOT NULL, split TEXT NOT NULL, n_ctx INTEGER NOT NULL,
            stride INTEGER, tokenizer TEXT, tokens INTEGER NOT NULL, loss REAL, ppl REAL, bpb REAL, word_ppl REAL,
            legacy_loss REAL, nan_count INTEGER NOT NULL DEFAULT 0, tokens_per_s REAL, peak_memory_bytes INTEGER,
            note TEXT NOT NULL DEFAULT ''
        );
        INSERT INTO results (created_at, model_kind, model_name, benchmark, split, n_ctx, tokens, loss, ppl, bpb, note)
        VALUES ('2024-05-01T10:00:00+00:00', 'hf', 'gpt2', 'wikitext-103', 'test', 1024, 245566, 3.2, 24.53, 0.98, 'baseline');
        PRAGMA user_version = 1;
        """
    )
    connection.close()


def column_names(path) -> list[str]:
    connection = sqlite3.connect(path)
    names = [record[1] for record in connection.execute("PRAGMA table_info(results)")]
    connection.close()
    return names


def test_version_1_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite3"
    write_version_1_database(path)
    with ResultsDB(path) as db:
        (old,) = db.rows()
        buckets = [
            {"start": 0, "stop": 512, "tokens": 511, "loss": 6.5},
            {"start": 512, "stop": None, "tokens": 9, "loss": None},
        ]
        new_id = db.add(make_row(arch_hash="beef", extra={"k": 1}, study="seed-fixes", position_losses=buckets))
        (_, new) = db.rows()
        assert [row.id for row in db.rows(study="seed-fixes")] == [new_id]
    assert (old.id, old.created_at, old.model_kind, old.model_name, old.n_ctx, old.tokens) == (
        1,
        "2024-05-01T10:00:00+00:00",
        "hf",
        "gpt2",
        1024,
        245566,
    )
    assert (old.loss, old.ppl, old.bpb, old.note) == (3.2, 24.53, 0.98, "baseline")
    assert (old.arch_hash, old.version, old.extra, old.study) == (None, None, {}, None)
    assert (new_id, new.arch_hash, new.extra) == (2, "beef", {"k": 1})
    assert (old.position_losses, new.position_losses) == (None, buckets)
    assert (old.task, old.recall, new.task) == (
        "lm",
        None,
        "lm",
    )  # rows from before version 5 measured language modelling
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    check.close()


def test_failed_upgrade_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite3"
    write_version_1_database(path)
    before = column_names(path)
    broken = (("ALTER TABLE results ADD COLUMN later TEXT", "NOT VALID SQL"),)
    monkeypatch.setattr(db_module, "MIGRATIONS", db_module.MIGRATIONS + broken)
    monkeypatch.setattr(db_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(UserError, match="not a readable results database"):
        ResultsDB(path)
    monkeypatch.undo()
    assert column_names(path) == before and "arch_hash" not in before
    with ResultsDB(path) as db:
        assert [row.model_name for row in db.rows()] == ["gpt2"]
    assert column_names(path)[-7:] == ["arch_hash", "version", "extra", "study", "position_losses", "task", "recall"]


def test_newer_schema_and_foreign_databases_are_refused(tmp_path):
    newer = tmp_path / "newer.sqlite3"
    connection = sqlite3.connect(newer)
    connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(UserError, match="newer than this bakallm"):
        ResultsDB(newer)

    foreign = tmp_path / "foreign.sqlite3"
    connection = sqlite3.connect(foreign)
    connection.execute("CREATE TABLE songs (title TEXT)")
    connection.close()
    with pytest.raises(UserError, match="not of bakallm results"):
        ResultsDB(foreign)

    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, just some words that are long enough to be a header" * 10)
    with pytest.raises(UserError, match="not a readable results database"):
        ResultsDB(text)


def test_must_exist_refuses_missing_file_without_creating_it(tmp_path):
    missing = tmp_path / "nothing" / "results.sqlite3"
    with pytest.raises(UserError, match="bakallm bench"):
        ResultsDB(missing, must_exist=True)
    assert not missing.parent.exists()


def test_default_path_follows_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DB_PATH_ENV, raising=False)
    assert default_db_path() == tmp_path / "results" / "results.sqlite3"
    monkeypatch.setenv(DB_PATH_ENV, str(tmp_path / "elsewhere.sqlite3"))
    assert default_db_path() == tmp_path / "elsewhere.sqlite3"
    with ResultsDB() as db:
        db.add(make_row())
    assert (tmp_path / "elsewhere.sqlite3").is_file()
