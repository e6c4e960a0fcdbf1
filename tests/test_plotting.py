import argparse
import struct

import pytest

from bakallm import plotting
from bakallm.commands import plot as plot_command
from bakallm.errors import UserError
from bakallm.plotting import debiased_ema, plot_context, plot_training
from bakallm.results.db import ResultRow, ResultsDB
from bakallm.training.metrics import MetricsLog

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_debiased_ema_values():
    assert debiased_ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    assert debiased_ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    # Debiasing keeps a constant series constant from the very first point.
    assert debiased_ema([4.0] * 5, 0.99) == pytest.approx([4.0] * 5)
    assert debiased_ema([], 0.9) == []


def write_run(run_dir, scale: float) -> None:
    with MetricsLog(run_dir) as log:
        for step in range(1, 41):
            log.log_step(step, 0, 512 * step, scale * (2.0 + 8.0 / step), 1e-3, 1.0, 1000.0, float(step))
        for step in (20, 40):
            log.log_eval(step, 512 * step, scale * 3.0, 20.0, 1.0, "val")
            log.log_eval(step, 512 * step, scale * 3.5, 33.0, None, "pg19")


def run_plot(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    plot_command.add_arguments(parser)
    return plot_command.run(parser.parse_args(list(argv)))


def test_plot_runs_writes_a_png(tmp_path, capsys):
    write_run(tmp_path / "a" / "run", 1.0)
    write_run(tmp_path / "b" / "run", 1.1)  # same folder name: labelled by path
    write_run(tmp_path / "c", 0.9)
    out = tmp_path / "plots" / "training.png"
    assert (
        run_plot(
            "runs",
            str(tmp_path / "a" / "run"),
            str(tmp_path / "b" / "run"),
            str(tmp_path / "c"),
            "-o",
            str(out),
            "--smooth",
            "0.8",
        )
        == 0
    )
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert png_size(out) == (960, 600)
    assert [p.name for p in out.parent.iterdir()] == ["training.png"]  # no temporary file left


def test_many_runs_get_distinct_lines_and_a_legend_beside_the_axes(tmp_path, monkeypatch):
    run_dirs = []
    for index in range(12):  # twelve runs of three curves each (train and two evaluation sets)
        run_dirs.append(tmp_path / f"run{index}")
        write_run(run_dirs[-1], 1.0 + index / 100)
    drawn = []
    monkeypatch.setattr(plotting, "_save_png", lambda figure, path: drawn.append(figure))
    plot_training(run_dirs, tmp_path / "many.png")
    (figure,) = drawn
    (axes,) = figure.axes
    train_lines = [line for line in axes.get_lines() if line.get_label().endswith(" train")]
    assert (
        len({(line.get_color(), line.get_linestyle()) for line in train_lines}) == 12
    )  # colours repeat after ten, styles do not
    assert axes.get_legend() is None and len(figure.legends) == 1  # 36 entries would cover the curves
    assert figure.get_figwidth() > 8


def test_plot_runs_user_errors(tmp_path):
    with pytest.raises(UserError, match="has no metrics.sqlite3"):
        plot_training([tmp_path], tmp_path / "out.png")
    MetricsLog(tmp_path / "empty").close()
    with pytest.raises(UserError, match="no training step or evaluation is logged yet"):
        plot_training([tmp_path / "empty"], tmp_path / "out.png")
    with pytest.raises(UserError, match="outside \\[0, 1\\)"):
        plot_training([tmp_path / "empty"], tmp_path / "out.png", smooth=1.0)
    with pytest.raises(UserError, match="does not end in .png"):
        plot_training([tmp_path / "empty"], tmp_path / "out.jpg")
    assert not (tmp_path / "out.png").exists()


def add_results(path) -> None:
    with ResultsDB(path) as db:
        for model_name, base in (("tiny", 4.0), ("gpt2", 3.6)):
            for n_ctx in (1024, 4096, 16384, 1 << 20):
                loss = base - 0.05 * n_ctx.bit_length()
                db.add(ResultRow("bakallm", model_name, "wikitext-103", "test", n_ctx, 1000, loss, 2.718**loss))
        db.add(ResultRow("hf", "gpt2", "pg19", "test", 1024, 1000, 3.0, 20.1))


def test_plot_context_writes_a_png(tmp_path, capsys):
    db_path = tmp_path / "results.sqlite3"
    add_results(db_path)
    out = tmp_path / "context.png"
    assert (
        run_plot(
            "context",
            "--db",
            str(db_path),
            "--benchmark",
            "wikitext-103",
            "--model",
            "tiny",
            "--model",
            "gpt2",
            "-o",
            str(out),
        )
        == 0
    )
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert png_size(out) == (960, 600)


def test_plot_context_user_errors(tmp_path):
    db_path = tmp_path / "results.sqlite3"
    with pytest.raises(UserError, match="no results yet"):
        plot_context(db_path, tmp_path / "out.png")
    add_results(db_path)
    with pytest.raises(UserError, match="mix several benchmarks \\(pg19/test, wikitext-103/test\\)"):
        plot_context(db_path, tmp_path / "out.png")
    with pytest.raises(UserError, match="no results for model\\(s\\) llama in .*: choose among gpt2, tiny"):
        plot_context(db_path, tmp_path / "out.png", models=["llama"], benchmark="wikitext-103")
    with pytest.raises(UserError, match="nothing to plot"):
        plot_context(db_path, tmp_path / "out.png", benchmark="wikitext-103", split="validation")
    assert not (tmp_path / "out.png").exists()


def test_plot_positions_draws_one_line_per_model_and_context(tmp_path, capsys, monkeypatch):
    db_path = tmp_path / "results.sqlite3"
    buckets = lambda first, later: [  # noqa: E731
        {"start": 0, "stop": 512, "tokens": 10, "loss": first},
        {"start": 512, "stop": 2048, "tokens": 20, "loss": later},
        {"start": 2048, "stop": None, "tokens": 0, "loss": None},  # an empty bucket is not drawn
    ]
    with ResultsDB(db_path) as db:
        db.add(
            ResultRow(
                "bakallm",
                "ours",
                "books",
                "test",
                512,
                30,
                5.0,
                148.4,
                checkpoint_hash="a",
                position_losses=buckets(6.0, 5.0),
            )
        )
        db.add(
            ResultRow(
                "bakallm",
                "ours",
                "books",
                "test",
                1 << 20,
                30,
                4.8,
                121.5,
                checkpoint_hash="a",
                position_losses=buckets(6.0, 4.5),
            )
        )
        db.add(
            ResultRow("bakallm", "old", "books", "test", 512, 30, 5.0, 148.4)
        )  # recorded before position losses: left out
    drawn = []
    monkeypatch.setattr(plotting, "_save_png", lambda figure, path: drawn.append(figure))
    out = tmp_path / "positions.png"
    assert run_plot("positions", "--db", str(db_path), "-o", str(out)) == 0
    (axes,) = drawn[0].axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}
    assert lines == {"ours, n_ctx 512": ([0, 1], [6.0, 5.0]), "ours, n_ctx 1M": ([0, 1], [6.0, 4.5])}
    assert [tick.get_text() for tick in axes.get_xticklabels()] == ["0-512", "512-2K", "2K+"]


def test_plot_positions_needs_position_losses(tmp_path):
    db_path = tmp_path / "results.sqlite3"
    add_results(db_path)
    with pytest.raises(UserError, match="hold no loss by position"):
        plotting.plot_positions(db_path, tmp_path / "out.png", benchmark="wikitext-103")
