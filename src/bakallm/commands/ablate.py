"""`bakallm ablate SPEC.yaml`: train and evaluate the variants of an ablation study (bakallm.ablation), resumably."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bakallm.ablation import StudyInterrupted, load_study, run_study
from bakallm.commands import options
from bakallm.training.interrupt import INTERRUPTED_EXIT_STATUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", metavar="SPEC.yaml", help="the study: shared setup, evaluation and variants (see docs/ablations.md)"
    )
    options.add_db(parser)
    parser.add_argument(
        "--output",
        type=Path,
        help="folder of the study's run directories (default: the file's output, else runs/ablations/STUDY)",
    )
    parser.add_argument(
        "--variants", help="comma-separated names: run only these variants (e.g. to share a study among processes)"
    )
    options.add_progress(parser)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    study = load_study(args.spec)
    if args.output is not None:
        study = replace(study, output=args.output)
    started = time.perf_counter()
    only = [name.strip() for name in args.variants.split(",") if name.strip()] if args.variants else None
    try:
        ran = run_study(study, args.db, progress=args.progress, only=only)
    except StudyInterrupted as interrupted:
        print(f"bakallm ablate: {interrupted}", file=sys.stderr)
        return INTERRUPTED_EXIT_STATUS
    print(
        f"study {study.name}: {len(ran)} variant(s) run now, "
        f"in {time.perf_counter() - started:.0f} s; see `bakallm results --study {study.name}`"
    )
    return 0
