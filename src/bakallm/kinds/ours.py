"""Our recurrent model as a model kind: a preset with --model-config fields over it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bakallm.acceleration import use_scan_backend
from bakallm.data.recall import RecallSample
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError
from bakallm.evaluation.evaluate import evaluate_bakallm
from bakallm.evaluation.recall import bakallm_answer_log_probs
from bakallm.evaluation.settings import OUR_BATCH_SIZE, OUR_N_CTX, EvalSettings
from bakallm.evaluation.tally import EvalResult
from bakallm.kinds import ModelKind, read_model_overrides
from bakallm.model.config import ModelConfig
from bakallm.model.io import MODEL_FILE, load_weights, model_files
from bakallm.model.network import BakaLM


def build_model_config(training: Mapping[str, Any], vocab_size: int) -> ModelConfig:
    """The preset, with the fields of the --model-config file over it, sized for the tokenizer."""
    overrides = read_model_overrides(training.get("model_config"))
    if "vocab_size" in overrides and overrides["vocab_size"] < vocab_size:
        raise UserError(
            f"The model's vocab_size {overrides['vocab_size']} is smaller than the tokenizer's {vocab_size}; raise it or use another tokenizer."
        )
    try:
        return ModelConfig.preset(
            training["preset"], **{**overrides, "vocab_size": max(vocab_size, overrides.get("vocab_size", 0))}
        )
    except ValueError as error:
        raise UserError(str(error)) from None


def untrained_memory_warning(train_ctx: int, config: ModelConfig) -> str | None:
    """Why the memory slots cannot learn under these settings, or None when they can.

    The write slots sit at the end of a window, so only the next window's loss can train what they
    write; with steps of one window that next window lies beyond the truncated backpropagation, and
    the write slots get exactly zero gradient (docs/quality.md measures it).
    """
    if config.n_memory == 0 or train_ctx >= 2 * config.window:
        return None
    return (
        f"--train-ctx {train_ctx} spans less than two windows of {config.window} tokens, so the "
        f"{config.n_memory} memory write slots get no gradient and never learn what to write; "
        f"use --train-ctx {2 * config.window} or more (fewer --batch-size rows keep the tokens per step)."
    )


class OurKind(ModelKind):
    name = "bakallm"
    noun = "our model"
    carries_state = True
    default_eval_batch_size = OUR_BATCH_SIZE

    def describe(self, training: Mapping[str, Any]) -> str:
        return f"preset {training['preset']}"

    def build(self, training: Mapping[str, Any], vocab_size: int, quiet: bool) -> BakaLM:
        return BakaLM(build_model_config(training, vocab_size))

    def config_values(self, model: BakaLM) -> dict[str, Any]:
        return model.config.to_dict()

    def training_warnings(self, training: Mapping[str, Any], model: BakaLM) -> list[str]:
        warning = untrained_memory_warning(training["train_ctx"], model.config)
        return [warning] if warning is not None else []

    def check_resume(self, saved_model: Mapping[str, Any], model: BakaLM, run_dir: Path) -> None:
        saved = ModelConfig.from_dict(dict(saved_model))
        changed = saved.differences(model.config)
        if changed:
            raise UserError(
                f"Cannot resume {run_dir}: model field {changed[0]} differs ({getattr(saved, changed[0])} saved, "
                f"{getattr(model.config, changed[0])} now); drop the flags that change it."
            )

    def load_start_weights(
        self, model: BakaLM, saved_model: Mapping[str, Any], checkpoint: Path, source: str
    ) -> list[str]:
        saved = ModelConfig.from_dict(dict(saved_model))
        changed = saved.differences(model.config)
        # Fields that change no parameter (carrying a part of the state, say) may differ: a staged
        # run can switch a path off. Any other difference leaves weights that do not fit.
        try:
            load_weights(model, checkpoint / MODEL_FILE)
        except (UserError, RuntimeError):
            field = changed[0] if changed else None
            because = (
                f": model field {field} differs ({getattr(saved, field)} there, {getattr(model.config, field)} here)"
                if field
                else ""
            )
            raise UserError(
                f"Cannot start from {source}{because}; its weights do not fit this model, so use the same preset and tokenizer."
            ) from None
        return [f"{name} {getattr(saved, name)} -> {getattr(model.config, name)}" for name in changed]

    def prepare(self, model: BakaLM, scan: str) -> BakaLM:
        return use_scan_backend(model, scan)

    def blocks(self, model: BakaLM) -> list[nn.Module]:
        return list(model.layers)

    def load(self, path: Path, device: torch.device) -> BakaLM:
        return BakaLM.from_pretrained(path, device)

    def default_n_ctx(self, model: BakaLM) -> int:
        return OUR_N_CTX

    def reading(self, context: int, reach: int) -> tuple[int, int | None]:
        return context, None  # the state is carried through `context` tokens, then reset

    def stride(self, settings: EvalSettings) -> int | None:
        return None  # every article is read once

    def evaluate(self, model: BakaLM, corpus: TokenizedCorpus, settings: EvalSettings) -> EvalResult:
        return evaluate_bakallm(model, corpus, settings)

    def answer_log_probs(
        self,
        model: BakaLM,
        samples: Sequence[RecallSample],
        n_ctx: int,
        batch_size: int,
        device: torch.device,
        keep_document_cache: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if keep_document_cache and not model.config.document_cache:
            raise UserError(
                "--keep-document-cache applies to models with the document cache, and this one has none; drop the flag."
            )
        return bakallm_answer_log_probs(model, samples, batch_size, device, n_ctx, keep_document_cache)

    def window(self, model: BakaLM) -> int:
        return model.config.window

    def attention_reach(self, model: BakaLM) -> int:
        return 2 * model.config.window if model.config.xl_cache else model.config.window

    def vocab_size(self, model: BakaLM) -> int:
        return model.config.vocab_size

    def architecture_hash(self, model: BakaLM) -> str:
        return hashlib.sha256(model.config.to_json().encode("utf-8")).hexdigest()

    def default_tokenizer(
        self, model: BakaLM, path: str | Path, training: Mapping[str, Any]
    ) -> tuple[str | None, str | None]:
        return training.get("tokenizer") if training else model_files(
            path
        ).tokenizer, None  # an exported folder names its own

    def weight_files(self, model: BakaLM, path: Path) -> list[Path]:
        return [model_files(path).weights]
