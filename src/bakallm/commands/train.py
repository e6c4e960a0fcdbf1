"""`bakallm train`: build a run from a preset, a recipe and flags, then train it.

The flags are derived from TrainConfig's fields (bakallm.training.arguments.option): their help
and default come from there, so a new training argument is one field.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import Field, fields
from typing import Any

from bakallm.commands import options
from bakallm.data import embedded
from bakallm.training.arguments import TrainConfig, default_text, train_config_from_args
from bakallm.training.interrupt import INTERRUPTED_EXIT_STATUS

# The flags of shared fields (bakallm.commands.options), without a default so that a recipe's value stands.
SHARED = {
    "tokenizer": lambda parser: options.add_tokenizer(parser, f"{embedded.TOKENIZER}, shipped with bakallm"),
    "device": lambda parser: options.add_device(parser, value=None),
    "threads": options.add_threads,
    "cache_dir": lambda parser: options.add_cache_dir(parser, type=str),
    "scan": options.add_scan,
    "progress": lambda parser: options.add_progress(parser, value=None),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with default None so that a recipe's values are kept unless a
    flag is given; a help text that does not state its default in words gets the field's default."""
    for field in fields(TrainConfig):
        if field.metadata["shared"]:
            SHARED[field.name](parser)
        else:
            parser.add_argument(_flag(field), **_parser_options(field))


def _flag(field: Field) -> str:
    return field.metadata["flag"] or "--" + field.name.replace("_", "-")


def _parser_options(field: Field) -> dict[str, Any]:
    help_text = field.metadata["help"]
    shown = default_text(field.name)
    if shown is not None and "(default" not in help_text:
        help_text = f"{help_text} {shown}"
    found: dict[str, Any] = {"dest": field.name, "help": help_text, "default": None, **field.metadata["parser_options"]}
    if isinstance(field.default, bool):
        found["action"] = "store_false" if field.default else "store_true"
    else:
        found["type"] = _value_type(field)
    return found


def _value_type(field: Field) -> type:
    annotation = str(field.type)
    return int if annotation.startswith("int") else float if annotation.startswith("float") else str


def run(args: argparse.Namespace) -> int:
    from bakallm.training.distributed import launch
    from bakallm.training.trainer import Trainer

    config, explicit = train_config_from_args(args)
    with launch() as distributed:  # one process, or the ranks of a torchrun launch
        summary = Trainer(config, explicit, distributed).train()
    if distributed.is_main:
        print(json.dumps(summary))
    return INTERRUPTED_EXIT_STATUS if summary.get("interrupted") else 0
