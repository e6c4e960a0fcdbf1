"""Where a run directory of `bakallm train` keeps its checkpoints, and how a path finds one.

    RUN_DIR/config.json                  model config and training arguments
    RUN_DIR/metrics.sqlite3              per-step metrics
    RUN_DIR/LATEST                       name of the newest complete checkpoint
    RUN_DIR/checkpoints/step-00000100/   model.safetensors and config.json (the run's, so that the
                                         folder describes its model by itself), optimizer.pt,
                                         trainer_state.json, recurrent_state.safetensors, rng.pt
    RUN_DIR/checkpoints/epoch-1/         the same, kept at each epoch end

The writing of checkpoints belongs to training (training/checkpoint.py), the loading of a model
from one to the model (model/files.py); both find them here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bakallm.errors import UserError

CONFIG_FILE = "config.json"
LATEST_FILE = "LATEST"
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS_DIR / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint folder) for a run directory or one of its checkpoint folders; a
    checkpoint folder moved out of its run is its own run directory (its config.json describes it)."""
    path = Path(path)
    if not path.exists():
        raise UserError(
            f"{path} does not exist; pass a run directory made by `bakallm train` or one of its checkpoint folders."
        )
    if (path / MODEL_FILE).is_file():
        if (path.parent.parent / CONFIG_FILE).is_file():
            return path.parent.parent, path
        if _is_run_config(path / CONFIG_FILE):
            return path, path
    if not (path / CONFIG_FILE).is_file():
        raise UserError(
            f"{path} is not a bakallm run directory (no {CONFIG_FILE}); pass the folder given to `bakallm train --run-dir`."
        )
    checkpoint = latest_checkpoint(path)
    if checkpoint is None and (path / LATEST_FILE).is_file():
        named = (path / LATEST_FILE).read_text(encoding="utf-8", errors="replace").strip()
        folders = sorted((path / CHECKPOINTS_DIR).glob("*")) if (path / CHECKPOINTS_DIR).is_dir() else []
        others = [folder.name for folder in folders if (folder / MODEL_FILE).is_file()]
        if not others:
            raise UserError(
                f"Run directory {path} holds no complete checkpoint (its {LATEST_FILE} names {named!r}, which is missing); train it again or pass another run."
            )
        raise UserError(
            f"{path / LATEST_FILE} names checkpoint {named!r}, which is missing; pass one of its checkpoint folders ({', '.join(others)})."
        )
    if checkpoint is None or not (checkpoint / MODEL_FILE).is_file():
        raise UserError(f"Run directory {path} holds no complete checkpoint yet; train it longer or pass another run.")
    return path, checkpoint


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """The config.json of a run directory (or of one of its checkpoint folders): "model" and "training"."""
    values = read_json_object(run_dir / CONFIG_FILE)
    if "model" not in values:
        raise UserError(f"{run_dir / CONFIG_FILE} has no 'model' section; it was not written by `bakallm train`.")
    return values


def checkpoint_config(run_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """The config a checkpoint was saved with: its own config.json, or, for checkpoints saved before
    they held one, its run's."""
    return read_run_config(checkpoint if (checkpoint / CONFIG_FILE).is_file() else run_dir)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file holding an object, or one sentence saying why it cannot be read."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"Cannot read {path} ({error}); the folder is damaged.") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} does not hold a JSON object; the folder is damaged.")
    return values


def _is_run_config(path: Path) -> bool:
    try:
        values = read_json_object(path)
    except UserError:
        return False
    return "model" in values and "training" in values
