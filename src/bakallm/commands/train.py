"""`bakallm train`: build a run from a preset, a recipe and flags, then train it."""

from __future__ import annotations

import argparse
import json

from bakallm.training.arguments import add_train_arguments, train_config_from_args
from bakallm.training.interrupt import INTERRUPTED_EXIT_STATUS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from bakallm.training.distributed import launch
    from bakallm.training.trainer import Trainer

    config, explicit = train_config_from_args(args)
    with launch() as distributed:  # one process, or the ranks of a torchrun launch
        summary = Trainer(config, explicit, distributed).train()
    if distributed.is_main:
        print(json.dumps(summary))
    return INTERRUPTED_EXIT_STATUS if summary.get("interrupted") else 0
