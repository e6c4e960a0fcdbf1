"""`bakallm plot`: training curves of run directories, benchmark loss against context length, and recall against distance."""

from __future__ import annotations

import argparse
from pathlib import Path

from bakallm.commands import options
from bakallm.plotting import plot_context, plot_positions, plot_recall, plot_training, study_run_dirs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    modes = parser.add_subparsers(dest="plot_mode", metavar="MODE", required=True)
    runs = modes.add_parser(
        "runs", help="training loss and evaluations against tokens seen, one line per run directory"
    )
    runs.add_argument(
        "run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories written by `bakallm train`"
    )
    _add_output(runs)
    runs.add_argument(
        "--smooth",
        type=float,
        default=0.9,
        help="exponential smoothing of the training loss, 0 (none) to below 1 (default: 0.9)",
    )
    context = modes.add_parser("context", help="benchmark loss against context length, one line per model")
    _add_result_filters(context, "only rows of this benchmark")
    study = modes.add_parser("study", help="training loss of every variant of a `bakallm ablate` study")
    study.add_argument("study", metavar="STUDY", help="the study name, as in its study file")
    options.add_db(study)
    _add_output(study)
    study.add_argument(
        "--smooth", type=float, default=0.9, help="exponential smoothing of the training loss (default: 0.9)"
    )
    positions = modes.add_parser(
        "positions",
        help="benchmark loss by position in the article, one line per model and context length (whole vs reset)",
    )
    _add_result_filters(positions, "only rows of this benchmark")
    recall = modes.add_parser(
        "recall",
        help="recall accuracy against the distance between fact and query (`bench --task recall`), one line per model and context",
    )
    _add_result_filters(recall, "only rows whose filler is this corpus")


def _add_result_filters(mode: argparse.ArgumentParser, benchmark_help: str) -> None:
    """The flags of a plot drawn from the results database: which rows, and where the PNG goes."""
    options.add_db(mode)
    mode.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model_name to plot; repeat for several (default: all)",
    )
    mode.add_argument("--benchmark", help=benchmark_help)
    mode.add_argument("--split", help="only rows of this split")
    _add_output(mode)


def _add_output(mode: argparse.ArgumentParser) -> None:
    mode.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")


def run(args: argparse.Namespace) -> int:
    if args.plot_mode == "runs":
        written = plot_training(args.run_dirs, args.output, args.smooth)
    elif args.plot_mode == "study":
        written = plot_training(study_run_dirs(args.db, args.study), args.output, args.smooth)
    elif args.plot_mode == "context":
        written = plot_context(args.db, args.output, args.models, args.benchmark, args.split)
    elif args.plot_mode == "positions":
        written = plot_positions(args.db, args.output, args.models, args.benchmark, args.split)
    else:
        written = plot_recall(args.db, args.output, args.models, args.benchmark, args.split)
    print(f"wrote {written}")
    return 0
