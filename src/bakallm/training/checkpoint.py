"""Run directories and checkpoints.

    RUN_DIR/config.json                  model config and training arguments
    RUN_DIR/metrics.sqlite3              per-step metrics
    RUN_DIR/LATEST                       name of the newest complete checkpoint
    RUN_DIR/checkpoints/step-00000100/   model.safetensors, optimizer.pt, trainer_state.json,
                                         recurrent_state.safetensors, rng.pt
    RUN_DIR/checkpoints/epoch-1/         the same, kept at each epoch end

A checkpoint is written into a hidden temporary folder and renamed into place when complete, then
LATEST is replaced atomically; a process killed while saving leaves the previous checkpoint as the
latest, and the leftover temporary folder is removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bakallm.atomic import reporting_no_room, write_text_atomic
from bakallm.errors import UserError
from bakallm.model import io as model_io

# The run directory's layout (bakallm.runs), re-exported for the trainer.
from bakallm.runs import (  # noqa: F401
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LATEST_FILE,
    MODEL_FILE,
    latest_checkpoint,
    read_run_config,
    resolve_checkpoint,
)

OPTIMIZER_FILE = "optimizer.pt"
TRAINER_STATE_FILE = "trainer_state.json"
RECURRENT_STATE_FILE = "recurrent_state.safetensors"
RNG_FILE = "rng.pt"


@dataclass
class Checkpoint:
    """What a checkpoint folder holds besides the weights (see `load_weights`)."""

    path: Path
    optimizer_state: dict[str, Any] | None
    trainer_state: dict[str, Any]
    recurrent_state: dict[str, torch.Tensor] | None
    rng_state: dict[str, Any] | None


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def savable_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """`weights` (default: the model's state dict) with one name per tied parameter, the first, as safetensors stores them."""
    weights = model.state_dict() if weights is None else weights
    first_name: dict[int, str] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(parameter), name)
    tied_copies = {
        name for name, parameter in model.named_parameters(remove_duplicate=False) if first_name[id(parameter)] != name
    }
    return {name: tensor for name, tensor in weights.items() if name not in tied_copies}


def save_checkpoint(
    run_dir: Path,
    name: str,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    recurrent_state: dict[str, torch.Tensor] | None,
    rng_state: dict[str, Any],
    keep_last: int,
    write_extras: Callable[[Path], None] | None = None,
) -> Path:
    """Writes checkpoint `name` completely, points LATEST at it, then prunes old step checkpoints.

    `weights` come from `savable_weights`; `optimizer_state` is an optimizer.state_dict();
    `write_extras(folder)` writes what else the checkpoint holds (a model kind's own files). The
    run's config.json is copied in, so that a checkpoint folder describes its model by itself.
    """
    checkpoints = run_dir / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    _remove_leftover_temporaries(checkpoints)
    temporary = checkpoints / f".tmp-{name}-{os.getpid()}"
    final = checkpoints / name
    previous = latest_checkpoint(run_dir)
    kept = (
        f"the last complete checkpoint, {previous.name}, is unchanged"
        if previous is not None
        else "no checkpoint was saved before"
    )
    try:
        with reporting_no_room(
            f"save checkpoint {final}", f"{kept}; free some space and continue with `bakallm train --resume {run_dir}`"
        ):
            temporary.mkdir()
            save_file(
                {key: value.detach().contiguous().cpu() for key, value in weights.items()}, temporary / MODEL_FILE
            )
            _torch_save(optimizer_state, temporary / OPTIMIZER_FILE)
            if recurrent_state is not None:
                save_file(
                    {key: value.detach().contiguous().cpu() for key, value in recurrent_state.items()},
                    temporary / RECURRENT_STATE_FILE,
                )
            _torch_save(rng_state, temporary / RNG_FILE)
            (temporary / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
            if (run_dir / CONFIG_FILE).is_file():
                shutil.copyfile(run_dir / CONFIG_FILE, temporary / CONFIG_FILE)
            if write_extras is not None:
                write_extras(temporary)
            _fsync_folder(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(temporary, final)
    write_text_atomic(run_dir / LATEST_FILE, name + "\n")
    _prune(checkpoints, keep_last, protect=name)
    return final


def _torch_save(value: Any, path: Path) -> None:
    # Through a Python file, so that a failed write keeps its OSError (and errno) behind torch's error.
    with open(path, "wb") as handle:
        torch.save(value, handle)


def _fsync_folder(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _remove_leftover_temporaries(checkpoints: Path) -> None:
    for leftover in checkpoints.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _prune(checkpoints: Path, keep_last: int, protect: str) -> None:
    """Keeps the newest `keep_last` step checkpoints; epoch snapshots are never pruned."""
    steps = sorted(path for path in checkpoints.glob("step-*") if path.is_dir())
    for old in steps[: max(len(steps) - keep_last, 0)]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def write_run_config(run_dir: Path, model: dict[str, Any], training: dict[str, Any]) -> None:
    """config.json of a run: the model's fields (a ModelConfig's, or a transformers config's) and the training arguments."""
    write_text_atomic(
        run_dir / CONFIG_FILE, json.dumps({"model": model, "training": training}, indent=2, sort_keys=True)
    )


def load_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Loads the weights of checkpoint folder `checkpoint` into `model`."""
    model_io.load_weights(model, checkpoint / MODEL_FILE)


def checkpoint_damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint folder (the first file that is missing or cannot be read
    whole, and why), or None when every file reads."""
    readers = {
        MODEL_FILE: load_file,
        OPTIMIZER_FILE: lambda path: torch.load(path, map_location="cpu", weights_only=True),
        TRAINER_STATE_FILE: lambda path: json.loads(path.read_text(encoding="utf-8")),
        RNG_FILE: lambda path: torch.load(path, map_location="cpu", weights_only=True),
    }
    if (checkpoint / RECURRENT_STATE_FILE).exists():
        readers[RECURRENT_STATE_FILE] = load_file
    for name, read in readers.items():
        try:
            read(checkpoint / name)
        except Exception as error:  # each reader has its own error types; any of them means this file is unusable
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            return f"{name}: {reason if len(reason) <= 120 else reason[:117] + '...'}"
    return None


def resumable_checkpoint(run_dir: Path, warn) -> Path | None:
    """The checkpoint to resume from: the one LATEST names, or, when that one is missing or damaged,
    the newest complete one before it (`warn` is told which, and why). None when there is none."""
    named = latest_checkpoint(run_dir)
    candidates = [] if named is None else [named]
    folders = (
        [
            folder
            for folder in (run_dir / CHECKPOINTS_DIR).glob("*")
            if folder.is_dir() and not folder.name.startswith(".")
        ]
        if (run_dir / CHECKPOINTS_DIR).is_dir()
        else []
    )
    candidates += sorted((folder for folder in folders if folder != named), key=_saved_step, reverse=True)
    problems = []
    if named is None and (run_dir / LATEST_FILE).is_file():
        problems.append(
            f"{LATEST_FILE} names {(run_dir / LATEST_FILE).read_text(encoding='utf-8', errors='replace').strip()!r}, which is missing"
        )
    for candidate in candidates:
        damage = checkpoint_damage(candidate)
        if damage is None:
            if problems:
                warn(f"{'; '.join(problems)}: resuming from {candidate.name}, the newest complete checkpoint")
            return candidate
        problems.append(f"{candidate.name} is damaged ({damage})")
    if problems:
        raise UserError(
            f"{run_dir} holds no complete checkpoint: {'; '.join(problems)}; start a new run with --run-dir."
        )
    return None


def _saved_step(checkpoint: Path) -> int:
    try:
        return int(read_trainer_state(checkpoint)["step"])
    except Exception:  # unreadable: tried last
        return -1


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8"))


def load_checkpoint(checkpoint: Path) -> Checkpoint:
    recurrent = checkpoint / RECURRENT_STATE_FILE
    return Checkpoint(
        path=checkpoint,
        optimizer_state=torch.load(checkpoint / OPTIMIZER_FILE, map_location="cpu", weights_only=True),
        trainer_state=read_trainer_state(checkpoint),
        recurrent_state=load_file(recurrent) if recurrent.is_file() else None,
        rng_state=torch.load(checkpoint / RNG_FILE, map_location="cpu", weights_only=True),
    )
