"""`bakallm` command line: one sub-command per task, each defined in the module that does the work.

Sub-command modules expose `add_arguments(parser)` and `run(args) -> int`; they import heavy
libraries inside `run`, so `bakallm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bakallm import __version__
from bakallm.errors import UserError

COMMANDS = {
    "train": ("bakallm.training.cli", "train a model (resumable run directory)"),
    "bench": ("bakallm.evaluation.cli", "benchmark a model on whole articles and record the result"),
    "results": ("bakallm.results.cli", "print the results table"),
    "plot": ("bakallm.plotting", "plot training curves or benchmark loss against context length"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bakallm", description="Train and benchmark long-context recurrent language models.")
    parser.add_argument("--version", action="version", version=f"bakallm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"bakallm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bakallm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
