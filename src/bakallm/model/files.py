"""A model's weights and config on disk: where they are and how they load into a model.

Three kinds of folder hold a model:

    RUN_DIR/config.json + RUN_DIR/LATEST -> RUN_DIR/checkpoints/NAME/model.safetensors   (bakallm train)
    RUN_DIR/checkpoints/NAME/model.safetensors                                          (one checkpoint)
    EXPORT_DIR/config.json (model_type "bakallm") + EXPORT_DIR/model.safetensors        (bakallm export)

Optimizer and trainer state, and the writing of checkpoints, belong to training (training/checkpoint.py).
This module knows no model class: the network (`BakaLM.from_pretrained`) and io.py (`load_model`) use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from bakallm.errors import UserError
from bakallm.model.config import ModelConfig

CONFIG_FILE = "config.json"
LATEST_FILE = "LATEST"
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
# In an exported folder: model_type, the model config, the weights' name prefix, and the tokenizer.
HF_MODEL_TYPE = "bakallm"
HF_CONFIG_KEY = "bakallm"
HF_WEIGHT_PREFIX = "model."
HF_TOKENIZER_KEY = "bakallm_tokenizer"


@dataclass(frozen=True)
class ModelFiles:
    """Where one model's weights are, its config, and the tokenizer it was trained with."""

    name: str  # the run directory's or the exported folder's name
    config: ModelConfig
    weights: Path
    weight_prefix: str  # what every weight name starts with in the file
    tokenizer: str | None  # a spec for bakallm.data.tokenizers.load_tokenizer, None when unknown


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / LATEST_FILE
    if not pointer.is_file():
        return None
    path = run_dir / CHECKPOINTS_DIR / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint folder) for a run directory or one of its checkpoint folders."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; pass a run directory made by `bakallm train` or one of its checkpoint folders.")
    if (path / MODEL_FILE).is_file() and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent, path
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path} is not a bakallm run directory (no {CONFIG_FILE}); pass the folder given to `bakallm train --run-dir`.")
    checkpoint = latest_checkpoint(path)
    if checkpoint is None and (path / LATEST_FILE).is_file():
        named = (path / LATEST_FILE).read_text(encoding="utf-8", errors="replace").strip()
        others = sorted(folder.name for folder in (path / CHECKPOINTS_DIR).glob("*") if (folder / MODEL_FILE).is_file()) if (path / CHECKPOINTS_DIR).is_dir() else []
        if not others:
            raise UserError(f"Run directory {path} holds no complete checkpoint (its {LATEST_FILE} names {named!r}, which is missing); train it again or pass another run.")
        raise UserError(f"{path / LATEST_FILE} names checkpoint {named!r}, which is missing; pass one of its checkpoint folders ({', '.join(others)}).")
    if checkpoint is None or not (checkpoint / MODEL_FILE).is_file():
        raise UserError(f"Run directory {path} holds no complete checkpoint yet; train it longer or pass another run.")
    return path, checkpoint


def read_run_config(run_dir: Path) -> dict[str, Any]:
    values = _read_json(run_dir / CONFIG_FILE)
    if "model" not in values:
        raise UserError(f"{run_dir / CONFIG_FILE} has no 'model' section; it was not written by `bakallm train`.")
    return values


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"Cannot read {path} ({error}); the folder is damaged.") from None
    if not isinstance(values, dict):
        raise UserError(f"{path} does not hold a JSON object; the folder is damaged.")
    return values


def is_exported_folder(path: Path) -> bool:
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("model_type") == HF_MODEL_TYPE
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def model_files(path: str | Path) -> ModelFiles:
    """The model in a run directory (its latest checkpoint), a checkpoint folder or an exported folder."""
    path = Path(path)
    if is_exported_folder(path):
        values = _read_json(path / CONFIG_FILE)
        tokenizer = values.get(HF_TOKENIZER_KEY)
        if isinstance(tokenizer, str) and (path / tokenizer).is_file():
            tokenizer = str(path / tokenizer)
        return ModelFiles(path.resolve().name, _model_config(values.get(HF_CONFIG_KEY), path), path / MODEL_FILE, HF_WEIGHT_PREFIX,
                          tokenizer if isinstance(tokenizer, str) else None)
    run_dir, checkpoint = resolve_checkpoint(path)
    values = read_run_config(run_dir)
    tokenizer = values.get("training", {}).get("tokenizer")
    return ModelFiles(run_dir.resolve().name, _model_config(values["model"], run_dir), checkpoint / MODEL_FILE, "",
                      tokenizer if isinstance(tokenizer, str) else None)


def _model_config(values: Any, folder: Path) -> ModelConfig:
    if not isinstance(values, dict):
        raise UserError(f"{folder / CONFIG_FILE} holds no model config; the folder was not written by bakallm.")
    try:
        return ModelConfig.from_dict(values)
    except ValueError as error:
        raise UserError(f"{folder / CONFIG_FILE} holds an invalid model config: {error}") from None


def load_weights(model: torch.nn.Module, weights: Path, prefix: str = "") -> None:
    """Loads a safetensors file into `model` (names in the file start with `prefix`), with one
    clear error when it does not fit."""
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{weights} is corrupted or unreadable ({str(error).splitlines()[0]}); use another checkpoint of the run.") from None
    state = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
    unexpected = sorted(set(tensors) - {prefix + name for name in state})
    missing, unknown = model.load_state_dict(state, strict=False)
    # A tied weight is stored once, under either of its names.
    parameters = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(parameters[name]) for name in state if name in parameters}
    missing = [name for name in missing if id(parameters.get(name)) not in loaded]
    unexpected += list(unknown)
    if missing or unexpected:
        raise UserError(
            f"{weights} does not match its model config (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); the checkpoint is incomplete or from another model."
        )
