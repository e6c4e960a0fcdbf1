"""The flags several commands share, each defined once here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bakallm.kernels import SCAN_BACKENDS
from bakallm.results.db import DB_PATH_ENV

TOKENIZER_HELP = "tokenizer.json file or folder, Hub name, or 'bytes'"


def add_db(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--db, of every command that reads or writes results."""
    parser.add_argument(
        "--db", type=Path, help=f"results database (default: ${DB_PATH_ENV}, else ./results/results.sqlite3)"
    )


def add_tokenizer(parser: argparse.ArgumentParser, default: str, value: str | None = None) -> None:
    """--tokenizer; `default` says in words what is used without the flag."""
    parser.add_argument("--tokenizer", default=value, help=f"{TOKENIZER_HELP} (default: {default})")


def add_device(parser: argparse.ArgumentParser, value: str | None = "auto") -> None:
    parser.add_argument("--device", default=value, help="cpu, cuda, cuda:N or auto (default auto)")


def add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for PyTorch (default: the CPUs this process may use); on a busy machine try 1",
    )


def add_cache_dir(parser: argparse.ArgumentParser, type: Any = Path) -> None:
    parser.add_argument(
        "--cache-dir", type=type, help="token cache folder (default $BAKALLM_CACHE or ~/.cache/bakallm/tokens)"
    )


def add_scan(parser: argparse.ArgumentParser, ours_only: bool = False) -> None:
    parser.add_argument(
        "--scan",
        choices=SCAN_BACKENDS,
        help=("our models only: " if ours_only else "")
        + "selective scan backend; auto: triton on CUDA when it imports and passes its self-check, else the "
        "log-depth parallel scan; on a CPU the compiled C++ scan, else the blocked scan (default auto)",
    )


EVAL_PRECISIONS = ("float32", "bfloat16")


def add_eval_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=EVAL_PRECISIONS,
        help="our models only: bfloat16 scores under bfloat16 autocast (celp18 1.8x faster on a CPU with AMX; the "
        "loss differed in its fifth digit), recorded in the row (default float32)",
    )


def add_progress(parser: argparse.ArgumentParser, value: bool | None = True) -> None:
    parser.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=value,
        help="no progress bars: text lines instead (the default when the output is not a terminal)",
    )
