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
    runs.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    runs.add_argument(
        "--smooth",
        type=float,
        default=0.9,
        help="exponential smoothing of the training loss, 0 (none) to below 1 (default: 0.9)",
    )
    context = modes.add_parser("context", help="benchmark loss against context length, one line per model")
    options.add_db(context)
    context.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model_name to plot; repeat for several (default: all)",
    )
    context.add_argument("--benchmark", help="only rows of this benchmark")
    context.add_argument("--split", help="only rows of this split")
    context.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    study = modes.add_parser("study", help="training loss of every variant of a `bakallm ablate` study")
    study.add_argument("study", metavar="STUDY", help="the study name, as in its study file")
    options.add_db(study)
    study.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    study.add_argument(
        "--smooth", type=float, default=0.9, help="exponential smoothing of the training loss (default: 0.9)"
    )
    positions = modes.add_parser(
        "positions",
        help="benchmark loss by position in the article, one line per model and context length (whole vs reset)",
    )
    options.add_db(positions)
    positions.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model_name to plot; repeat for several (default: all)",
    )
    positions.add_argument("--benchmark", help="only rows of this benchmark")
    positions.add_argument("--split", help="only rows of this split")
    positions.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    recall = modes.add_parser(
        "recall",
        help="recall accuracy against the distance between fact and query (`bench --task recall`), one line per model and context",
    )
    options.add_db(recall)
    recall.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="a model_name to plot; repeat for several (default: all)",
    )
    recall.add_argument("--benchmark", help="only rows whose filler is this corpus")
    recall.add_argument("--split", help="only rows of this split")
    recall.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")


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
