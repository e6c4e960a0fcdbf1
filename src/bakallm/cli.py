"""`bakallm` command line: one sub-command per task, each a module of bakallm.commands.

Sub-command modules expose `add_arguments(parser)` and `run(args) -> int`. Only the module of the
command being run is imported, so `bakallm --help` stays fast and one command's optional
dependencies never affect another.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from bakallm import __version__
from bakallm.errors import UserError

COMMANDS = {
    "first-run": (
        "bakallm.commands.first_run",
        "train and score two small models in about ten minutes on the books shipped with bakallm",
    ),
    "train": ("bakallm.commands.train", "train a model (resumable run directory)"),
    "bench": ("bakallm.commands.bench", "benchmark a model on whole articles and record the result"),
    "ablate": ("bakallm.commands.ablate", "train and evaluate the variants of an ablation study (resumable)"),
    "generate": ("bakallm.commands.generate", "continue a text with a trained model (streams the new text to stdout)"),
    "export": (
        "bakallm.commands.export",
        "write a model as a Hugging Face folder (AutoModelForCausalLM, trust_remote_code)",
    ),
    "results": ("bakallm.commands.results", "print the results table"),
    "plot": ("bakallm.commands.plot", "plot training curves or benchmark loss against context length"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, with the full arguments of `command` (the others are listed by name only)."""
    parser = argparse.ArgumentParser(
        prog="bakallm", description="Train and benchmark long-context recurrent language models."
    )
    parser.add_argument("--version", action="version", version=f"bakallm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(signal, "SIGXFSZ") and threading.current_thread() is threading.main_thread():
        # Past a file-size limit (ulimit -f) the write fails with EFBIG, which we report in one
        # sentence, instead of the signal killing the process mid-save.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    command = next((word for word in argv if not word.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
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
