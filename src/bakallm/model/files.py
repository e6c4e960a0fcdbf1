"""A model's weights and config on disk: where they are and how they load into a model.

Three kinds of folder hold a model: a run directory of `bakallm train` (its latest checkpoint), one
of its checkpoint folders (model.safetensors beside the run's config.json), and a folder of
`bakallm export` (config.json with model_type "bakallm", model.safetensors). Where a run keeps its
checkpoints is bakallm.runs'; optimizer and trainer state, and the writing of checkpoints, belong
to training (training/checkpoint.py).
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
from bakallm.runs import CONFIG_FILE, MODEL_FILE, checkpoint_config, read_json_object, resolve_checkpoint

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
        values = read_json_object(path / CONFIG_FILE)
        tokenizer = values.get(HF_TOKENIZER_KEY)
        if isinstance(tokenizer, str) and (path / tokenizer).is_file():
            tokenizer = str(path / tokenizer)
        return ModelFiles(
            path.resolve().name,
            _model_config(values.get(HF_CONFIG_KEY), path),
            path / MODEL_FILE,
            HF_WEIGHT_PREFIX,
            tokenizer if isinstance(tokenizer, str) else None,
        )
    run_dir, checkpoint = resolve_checkpoint(path)  # the run directory's layout is bakallm.runs'
    values = checkpoint_config(run_dir, checkpoint)
    tokenizer = values.get("training", {}).get("tokenizer")
    return ModelFiles(
        run_dir.resolve().name,
        _model_config(values["model"], run_dir),
        checkpoint / MODEL_FILE,
        "",
        tokenizer if isinstance(tokenizer, str) else None,
    )


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
        raise UserError(
            f"{weights} is corrupted or unreadable ({str(error).splitlines()[0]}); use another checkpoint of the run."
        ) from None
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
