"""`bakallm export RUN OUT_DIR`: a model as a Hugging Face folder (see bakallm.huggingface.export), optionally pushed to the Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from bakallm.commands import options
from bakallm.huggingface.export import export, push_to_hub


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        metavar="RUN",
        help="a run directory of `bakallm train` (its latest checkpoint) or one checkpoint folder",
    )
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=Path,
        help="the folder to write: new, empty, or (with --force) one whose files of the same names are replaced",
    )
    parser.add_argument(
        "--force", action="store_true", help="write into a folder that already holds files (never into a run directory)"
    )
    options.add_tokenizer(parser, "the run's own")
    parser.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hugging Face Hub model repository"
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository as private")


def run(args: argparse.Namespace) -> int:
    folder = export(args.model, args.out_dir, args.tokenizer, force=args.force)
    print(f"bakallm export: wrote {folder}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, private=args.private)
        print(f"bakallm export: uploaded to {url}")
    return 0
