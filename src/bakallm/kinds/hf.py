"""A Hugging Face causal LM behind our model's call, so that one trainer trains both.

`bakallm train --hf-config PATH` builds a fresh `transformers` model from a config.json and wraps
it here: same data, batcher, optimizer and schedule as our runs, with no recurrent state, so every
training step starts from nothing (as `--no-carry-state` does for our model).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bakallm.errors import UserError
from bakallm.kernels.cross_entropy import linear_cross_entropy
from bakallm.model.network import IGNORE_INDEX, ModelOutput, scored_positions

HF_FOLDER = "hf"  # each checkpoint's model as a transformers folder, readable by `bakallm bench --hf`


class HFCausalLM(nn.Module):
    """Wraps a transformers causal LM: `model(input_ids, targets=...)` returns our `ModelOutput`."""

    carries_state = False

    def __init__(self, hf_model: nn.Module, vocab_size: int):
        super().__init__()
        self.hf = hf_model
        self.vocab_size = vocab_size  # the tokenizer's: logits past it (embedding padding) are dropped

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing per layer, transformers' own (bakallm.acceleration.checkpoint_layers)."""
        self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(
        self,
        input_ids: torch.Tensor,
        state: None = None,
        reset: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        head = self._plain_head()
        if targets is not None and not return_logits and head is not None:
            # The loss without the logits: the output layer in chunks of tokens, at scored positions only (ours does the same).
            hidden = self.hf.base_model(input_ids=input_ids).last_hidden_state
            n_targets = (targets != IGNORE_INDEX).sum()
            kept_hidden, kept_targets, _ = scored_positions(hidden.flatten(0, 1), targets.flatten())
            loss = linear_cross_entropy(kept_hidden, head.weight, kept_targets, self.vocab_size)
            return ModelOutput(logits=None, loss=loss / n_targets.clamp(min=1), state=None, n_targets=n_targets)
        logits = self.hf(input_ids=input_ids).logits[..., : self.vocab_size]
        loss = n_targets = None
        if targets is not None:
            n_targets = (targets != IGNORE_INDEX).sum()
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            loss = loss / n_targets.clamp(min=1)
        return ModelOutput(logits=logits if return_logits else None, loss=loss, state=None, n_targets=n_targets)

    def _plain_head(self) -> nn.Linear | None:
        """The output layer when the logits are exactly it applied to the base model's output (a
        bias-free linear map, no logit scaling or soft-capping), else None."""
        head = self.hf.get_output_embeddings()
        config = self.hf.config
        scaled = any(getattr(config, name, None) not in (None, 1.0) for name in ("logit_scale", "final_logit_softcapping", "logits_scaling"))
        return head if isinstance(head, nn.Linear) and head.bias is None and not scaled else None

    def config_dict(self) -> dict[str, Any]:
        return self.hf.config.to_dict()

    def num_parameters(self) -> dict[str, int]:
        from bakallm.evaluation.hf_baseline import hf_parameter_counts

        counts = hf_parameter_counts(self.hf)
        return {**counts, "non_embedding": counts["total"] - counts["embedding"]}

    def save_pretrained_atomic(self, folder: Path) -> None:
        """Writes the transformers folder completely under a temporary name, then renames it into place."""
        temporary = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(temporary, ignore_errors=True)
        self.hf.save_pretrained(temporary)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temporary, folder)


def build_hf_model(config_path: str, overrides: dict[str, Any], vocab_size: int) -> HFCausalLM:
    """A freshly initialised causal LM from a config.json (or its folder), with `overrides` applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--hf-config {config_path} is not a config.json file or a folder holding one; pass the path of a transformers config.")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
        model_type = values.pop("model_type")
        # The dtype a checkpoint was stored in; we train in float32 (or --precision).
        values.pop("torch_dtype", None)
        values.pop("dtype", None)
        config = AutoConfig.for_model(model_type, **{**values, **overrides})
    except (json.JSONDecodeError, KeyError, ValueError) as error:
        raise UserError(f"--hf-config {file} is not a usable transformers config ({error}); check its model_type and fields.") from None
    if config.vocab_size < vocab_size:
        raise UserError(f"The HF config's vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}; raise it with --model-config.")
    return HFCausalLM(AutoModelForCausalLM.from_config(config, dtype=torch.float32), vocab_size)

