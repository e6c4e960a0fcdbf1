"""A transformers causal LM as a model kind, behind our model's call, so that one trainer trains both.

`bakallm train --hf-config PATH` builds a fresh `transformers` model from a config.json and wraps
it here: same data, batcher, optimizer and schedule as our runs, with no recurrent state, so every
training step starts from nothing (as `--no-carry-state` does for our model). `bakallm bench --hf`
scores any causal LM of the Hub or a local folder through the same kind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bakallm.data.recall import RecallSample
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.data.tokenizers import DEFAULT_TOKENIZER, TOKENIZER_FILE
from bakallm.errors import UserError
from bakallm.evaluation.hf_baseline import (
    default_stride,
    evaluate_hf,
    hf_architecture_hash,
    hf_model_folder,
    hf_parameter_counts,
    hf_vocab_size,
    hf_weight_files,
    load_hf_model,
)
from bakallm.evaluation.recall import hf_answer_log_probs
from bakallm.evaluation.settings import TRANSFORMER_BATCH_SIZE, TRANSFORMER_N_CTX, EvalSettings
from bakallm.evaluation.tally import EvalResult
from bakallm.kernels.cross_entropy import linear_cross_entropy
from bakallm.kinds import ModelKind, read_model_overrides
from bakallm.model.io import load_weights
from bakallm.model.network import IGNORE_INDEX, ModelOutput, scored_positions
from bakallm.runs import CHECKPOINTS_DIR, MODEL_FILE, resolve_checkpoint

HF_FOLDER = "hf"  # each checkpoint's model as a transformers folder, readable by `bakallm bench --hf`
# Fields of a transformers config that decide the shapes of its weights.
SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "tie_word_embeddings",
)


class HFCausalLM(nn.Module):
    """Wraps a transformers causal LM: `model(input_ids, targets=...)` returns our `ModelOutput`."""

    def __init__(self, hf_model: nn.Module, vocab_size: int):
        super().__init__()
        self.hf = hf_model
        self.vocab_size = vocab_size  # the tokenizer's: logits past it (embedding padding) are dropped

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
            loss = F.cross_entropy(
                logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
            loss = loss / n_targets.clamp(min=1)
        return ModelOutput(logits=logits if return_logits else None, loss=loss, state=None, n_targets=n_targets)

    def _plain_head(self) -> nn.Linear | None:
        """The output layer when the logits are exactly it applied to the base model's output (a
        bias-free linear map, no logit scaling or soft-capping), else None."""
        head = self.hf.get_output_embeddings()
        config = self.hf.config
        scaled = any(
            getattr(config, name, None) not in (None, 1.0)
            for name in ("logit_scale", "final_logit_softcapping", "logits_scaling")
        )
        return head if isinstance(head, nn.Linear) and head.bias is None and not scaled else None

    def config_dict(self) -> dict[str, Any]:
        return self.hf.config.to_dict()

    def num_parameters(self) -> dict[str, int]:
        counts = hf_parameter_counts(self.hf)
        return {**counts, "non_embedding": counts["total"] - counts["embedding"]}

    def save_pretrained(self, folder: Path, weights: dict[str, torch.Tensor]) -> None:
        """Writes the transformers folder of this module's whole state dict `weights` (gathered when
        its own parameters are shards under FSDP2, which transformers cannot save)."""
        prefix = "hf."
        self.hf.save_pretrained(
            folder,
            state_dict={name[len(prefix) :]: tensor for name, tensor in weights.items() if name.startswith(prefix)},
        )


def build_hf_model(config_path: str, overrides: dict[str, Any], vocab_size: int) -> HFCausalLM:
    """A freshly initialised causal LM from a config.json (or its folder), with `overrides` applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(
            f"--hf-config {config_path} is not a config.json file or a folder holding one; pass the path of a transformers config."
        )
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
        model_type = values.pop("model_type")
        # The dtype a checkpoint was stored in; we train in float32 (or --precision).
        values.pop("torch_dtype", None)
        values.pop("dtype", None)
        config = AutoConfig.for_model(model_type, **{**values, **overrides})
    except (json.JSONDecodeError, KeyError, ValueError) as error:
        raise UserError(
            f"--hf-config {file} is not a usable transformers config ({error}); check its model_type and fields."
        ) from None
    if config.vocab_size < vocab_size:
        raise UserError(
            f"The HF config's vocab_size {config.vocab_size} is smaller than the tokenizer's {vocab_size}; raise it with --model-config."
        )
    return HFCausalLM(AutoModelForCausalLM.from_config(config, dtype=torch.float32), vocab_size)


class TransformersKind(ModelKind):
    name = "hf"
    noun = "a transformers model"
    carries_state = False
    default_eval_batch_size = TRANSFORMER_BATCH_SIZE

    def describe(self, training: Mapping[str, Any]) -> str:
        return f"transformers model of {training['hf_config']}"

    def build(self, training: Mapping[str, Any], vocab_size: int, quiet: bool) -> HFCausalLM:
        if quiet:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # its bars on saving and loading checkpoints, which fill log files
        return build_hf_model(training["hf_config"], read_model_overrides(training.get("model_config")), vocab_size)

    def config_values(self, model: HFCausalLM) -> dict[str, Any]:
        return model.config_dict()

    def load_start_weights(
        self, model: HFCausalLM, saved_model: Mapping[str, Any], checkpoint: Path, source: str
    ) -> list[str]:
        changed = sorted(
            key for key, value in saved_model.items() if model.config_dict().get(key) != value and key in SHAPE_FIELDS
        )
        if changed:
            raise UserError(
                f"Cannot start from {source}: its transformers config differs in {', '.join(changed)}; use the same --hf-config and --model-config."
            )
        load_weights(model, checkpoint / MODEL_FILE)
        return []

    def save_extras(self, model: HFCausalLM, checkpoint: Path, weights: dict[str, torch.Tensor]) -> None:
        # Into the checkpoint's temporary folder: the checkpoint appears with its transformers folder or not at all.
        model.save_pretrained(checkpoint / HF_FOLDER, weights)

    def blocks(self, model: HFCausalLM) -> list[nn.Module]:
        # The blocks transformers itself never splits across devices: its decoder layers.
        unit_names = set(getattr(model.hf, "_no_split_modules", None) or ())
        return [module for module in model.hf.modules() if type(module).__name__ in unit_names]

    def load(self, path: Path | str, device: torch.device) -> HFCausalLM:
        """A run of `bakallm train --hf-config` (its checkpoint's transformers folder), a transformers folder or a Hub name."""
        folder = Path(path).expanduser()
        if (folder / HF_FOLDER).is_dir() or (folder / CHECKPOINTS_DIR).is_dir():  # one of its checkpoints, or the run
            _, checkpoint = resolve_checkpoint(folder)
            path = checkpoint / HF_FOLDER
        model = load_hf_model(path, device)
        return HFCausalLM(model, hf_vocab_size(model))

    def default_n_ctx(self, model: HFCausalLM) -> int:
        return min(TRANSFORMER_N_CTX, getattr(model.hf.config, "max_position_embeddings", None) or TRANSFORMER_N_CTX)

    def reading(self, context: int, reach: int) -> tuple[int, int | None]:
        # Beyond its reach a transformer slides windows of the reach by half of it (each token sees at
        # least half the reach); within it, windows of `context` follow each other as our resets do.
        n_ctx = min(context, reach)
        return n_ctx, default_stride(n_ctx) if context > reach else n_ctx

    def stride(self, settings: EvalSettings) -> int | None:
        return default_stride(settings.n_ctx) if settings.stride is None else settings.stride

    def evaluate(self, model: HFCausalLM, corpus: TokenizedCorpus, settings: EvalSettings) -> EvalResult:
        return evaluate_hf(model.hf, corpus, settings)

    def answer_log_probs(
        self,
        model: HFCausalLM,
        samples: Sequence[RecallSample],
        n_ctx: int,
        batch_size: int,
        device: torch.device,
        keep_document_cache: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if keep_document_cache:
            raise UserError(
                "--keep-document-cache applies only to our models; a transformers model has no document cache."
            )
        return hf_answer_log_probs(model.hf, samples, n_ctx, batch_size, device)

    def window(self, model: HFCausalLM) -> None:
        return None

    def attention_reach(self, model: HFCausalLM) -> None:
        return None

    def vocab_size(self, model: HFCausalLM) -> int:
        return hf_vocab_size(model.hf)

    def architecture_hash(self, model: HFCausalLM) -> str:
        return hf_architecture_hash(model.hf)

    def default_tokenizer(
        self, model: HFCausalLM, path: str | Path, training: Mapping[str, Any]
    ) -> tuple[str | None, str | None]:
        if training:
            return training.get("tokenizer"), None
        folder = hf_model_folder(model.hf)
        if folder is not None and (folder / TOKENIZER_FILE).is_file():
            return str(folder / TOKENIZER_FILE), None
        if not Path(path).expanduser().is_dir():
            return str(path), None  # a Hub model: load_tokenizer fetches the tokenizer.json of its repository
        note = f"{path} holds no {TOKENIZER_FILE}, so its text is tokenized with {DEFAULT_TOKENIZER} (choose with --tokenizer)."
        return DEFAULT_TOKENIZER, note

    def weight_files(self, model: HFCausalLM, path: Path) -> list[Path]:
        folder = hf_model_folder(model.hf)
        return hf_weight_files(folder) if folder is not None else []
