import argparse
import csv
import io
import json
import math
from dataclasses import replace

import pytest

from bakallm.commands import results as results_cli
from bakallm.errors import UserError
from bakallm.results.db import ResultRow, ResultsDB
from bakallm.results.table import format_table, parse_columns


def make_row(row_id, n_ctx, loss, ppl, bpb, note, **changes) -> ResultRow:
    values = dict(
        model_kind="bakallm",
        model_name="tiny",
        benchmark="wikitext-103",
        split="test",
        n_ctx=n_ctx,
        tokens=245566,
        loss=loss,
        ppl=ppl,
        bpb=bpb,
        note=note,
        id=row_id,
    )
    values.update(changes)
    return ResultRow(**values)


ROWS = [
    make_row(1, 4096, 3.61234, 37.0412, 1.04444, "after 1 epoch"),
    make_row(2, 1048576, 3.47581, 32.3234, 1.01234, "after 2 epoch"),
    make_row(3, 1024, 3.9, 49.402, None, "a | b"),
]


def test_markdown_sorted_by_loss_with_bold_rows():
    expected = (
        "| model_name | benchmark | split | n_ctx | loss | ppl | bpb | note |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| **tiny** | **wikitext-103** | **test** | **1048576** | **3.4758** | **32.32** | **1.0123** | **after 2 epoch** |\n"
        "| tiny | wikitext-103 | test | 4096 | 3.6123 | 37.04 | 1.0444 | after 1 epoch |\n"
        "| **tiny** | **wikitext-103** | **test** | **1024** | **3.9000** | **49.40** |  | **a \\| b** |\n"
    )
    assert format_table(ROWS, bold_ids={2, 3}) == expected


def test_markdown_chosen_columns_and_nan_last():
    rows = ROWS + [make_row(4, 512, math.nan, math.nan, None, "diverged", model_name="huge")]
    expected = (
        "| model_name | n_ctx | loss |\n"
        "|---|---|---|\n"
        "| tiny | 1048576 | 3.4758 |\n"
        "| tiny | 4096 | 3.6123 |\n"
        "| tiny | 1024 | 3.9000 |\n"
        "| huge | 512 | nan |\n"
    )
    assert format_table(rows, columns=parse_columns("model_name, n_ctx,loss")) == expected


def test_csv_keeps_full_precision():
    text = format_table(ROWS, columns=["id", "n_ctx", "loss", "bpb"], fmt="csv")
    assert text.splitlines()[0] == "id,n_ctx,loss,bpb"
    records = list(csv.DictReader(io.StringIO(text)))
    assert [(r["id"], r["n_ctx"], r["loss"], r["bpb"]) for r in records] == [
        ("2", "1048576", "3.47581", "1.01234"),
        ("1", "4096", "3.61234", "1.04444"),
        ("3", "1024", "3.9", ""),
    ]


def test_json_is_a_list_of_objects():
    rows = ROWS + [make_row(4, 512, math.nan, math.nan, None, "diverged", extra={"seed": 1})]
    objects = json.loads(format_table(rows, columns=["n_ctx", "loss", "bpb", "extra"], fmt="json"))
    assert objects == [
        {"n_ctx": 1048576, "loss": 3.47581, "bpb": 1.01234, "extra": {}},
        {"n_ctx": 4096, "loss": 3.61234, "bpb": 1.04444, "extra": {}},
        {"n_ctx": 1024, "loss": 3.9, "bpb": None, "extra": {}},
        {"n_ctx": 512, "loss": None, "bpb": None, "extra": {"seed": 1}},
    ]


def test_unknown_columns_and_formats_are_user_errors():
    with pytest.raises(UserError, match="unknown column\\(s\\) perplexity"):
        parse_columns("n_ctx,perplexity")
    with pytest.raises(UserError, match="--columns is empty"):
        parse_columns(" , ")
    with pytest.raises(UserError, match="unknown table format 'html'"):
        format_table(ROWS, fmt="html")


# ----- `bakallm results` -----
def run_results(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    results_cli.add_arguments(parser)
    return results_cli.run(parser.parse_args(list(argv)))


def fill(path, rows):
    with ResultsDB(path) as db:
        for row in rows:
            db.add(row)


def test_results_command_bolds_rows_added_since_previous_listing(tmp_path, capsys):
    path = tmp_path / "results.sqlite3"
    fill(path, ROWS[:2])
    assert run_results("--db", str(path)) == 0
    first = capsys.readouterr().out
    assert first == (
        "| model_name | benchmark | split | n_ctx | loss | ppl | bpb | note |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| **tiny** | **wikitext-103** | **test** | **1048576** | **3.4758** | **32.32** | **1.0123** | **after 2 epoch** |\n"
        "| **tiny** | **wikitext-103** | **test** | **4096** | **3.6123** | **37.04** | **1.0444** | **after 1 epoch** |\n"
    )
    fill(path, ROWS[2:])
    assert run_results("--db", str(path)) == 0
    assert capsys.readouterr().out == (
        "| model_name | benchmark | split | n_ctx | loss | ppl | bpb | note |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| tiny | wikitext-103 | test | 1048576 | 3.4758 | 32.32 | 1.0123 | after 2 epoch |\n"
        "| tiny | wikitext-103 | test | 4096 | 3.6123 | 37.04 | 1.0444 | after 1 epoch |\n"
        "| **tiny** | **wikitext-103** | **test** | **1024** | **3.9000** | **49.40** |  | **a \\| b** |\n"
    )
    run_results("--db", str(path), "--columns", "id,n_ctx")
    assert "**" not in capsys.readouterr().out
    run_results("--db", str(path), "--columns", "id,n_ctx", "--since", "2")
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| **2** | **1048576** |",
        "| 1 | 4096 |",
        "| **3** | **1024** |",
    ]


def test_results_command_since_time_and_machine_formats_keep_the_marker(tmp_path, capsys):
    path = tmp_path / "results.sqlite3"
    fill(path, [replace(ROWS[0], created_at="2024-01-01T00:00:00+00:00"), ROWS[1]])
    run_results("--db", str(path), "--columns", "id", "--since", "2024-06-01")
    assert capsys.readouterr().out.splitlines()[2:] == ["| **2** |", "| 1 |"]
    run_results("--db", str(path), "--format", "json", "--columns", "id,n_ctx")
    assert json.loads(capsys.readouterr().out) == [{"id": 2, "n_ctx": 1048576}, {"id": 1, "n_ctx": 4096}]
    with ResultsDB(path) as db:
        assert db.last_listed_id() == 2  # the Markdown listing set it; the JSON export left it


def test_results_command_filters_and_all_columns(tmp_path, capsys):
    path = tmp_path / "results.sqlite3"
    fill(path, [ROWS[0], make_row(None, 8192, 2.0, 7.39, 0.7, "pg", benchmark="pg19")])
    run_results("--db", str(path), "--benchmark", "pg19", "--format", "csv", "--all-columns")
    records = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["id"], r["benchmark"], r["n_ctx"], r["note"]) for r in records] == [("2", "pg19", "8192", "pg")]
    assert list(records[0])[:4] == ["id", "created_at", "model_kind", "model_name"]
    assert run_results("--db", str(path), "--benchmark", "lambada", "--split", "test") == 0
    assert capsys.readouterr().out == f"no results in {path} for benchmark lambada, split test.\n"


def test_results_command_missing_database_and_bad_since(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BAKALLM_RESULTS_DB", raising=False)
    with pytest.raises(UserError) as error:
        run_results()
    assert str(error.value) == (
        f"there are no results yet at {tmp_path / 'results' / 'results.sqlite3'}: record some with `bakallm bench`, "
        "or point --db or $BAKALLM_RESULTS_DB at an existing results database."
    )
    assert not (tmp_path / "results").exists()
    fill(tmp_path / "r.sqlite3", ROWS[:1])
    with pytest.raises(UserError, match="neither a row id nor an ISO date/time"):
        run_results("--db", str(tmp_path / "r.sqlite3"), "--since", "yesterday")


def test_bakallm_results_through_main_cli(tmp_path, capsys):
    from bakallm.cli import main

    missing = tmp_path / "none.sqlite3"
    assert main(["results", "--db", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"bakallm results: error: there are no results yet at {missing}: record some with `bakallm bench`, "
        "or point --db or $BAKALLM_RESULTS_DB at an existing results database.\n"
    )
    fill(tmp_path / "r.sqlite3", ROWS[1:2])
    assert main(["results", "--db", str(tmp_path / "r.sqlite3"), "--columns", "n_ctx,loss"]) == 0
    assert capsys.readouterr().out == "| n_ctx | loss |\n|---|---|\n| **1048576** | **3.4758** |\n"
