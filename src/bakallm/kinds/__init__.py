"""The kinds of model bakallm trains and scores, behind one seam.

A `ModelKind` bundles what differs between our recurrent BakaLM ("bakallm") and a transformers
causal LM ("hf"): how it is built from training arguments, loaded from a run, scored on a corpus
or on recall samples, sharded, and what it records. The trainer, the ablation runner, bench and the
distributed code ask the kind and never branch on which one it is (tests/test_kinds.py checks).
Adding a kind is a new module here and one line in `KINDS`.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from bakallm.errors import UserError
from bakallm.results.rows import ModelRecord, sha256_files

if TYPE_CHECKING:
    import torch
    from torch import nn

    from bakallm.data.recall import RecallSample
    from bakallm.data.token_cache import TokenizedCorpus
    from bakallm.evaluation.settings import EvalSettings
    from bakallm.evaluation.tally import EvalResult

# name -> (module, class): imported when first asked for, so that our kind never pays for transformers.
KINDS = {"bakallm": ("bakallm.kinds.ours", "OurKind"), "hf": ("bakallm.kinds.hf", "TransformersKind")}
# The context of whole-document reading: our models carry their state through any document at it.
WHOLE_DOCUMENT_N_CTX = 1 << 40


class ModelKind(ABC):
    """One kind of model. `training` arguments are a run's TrainConfig as a mapping (saved or live)."""

    name: ClassVar[str]  # stored in result rows (ResultRow.model_kind) and study results
    noun: ClassVar[str]  # the kind in a sentence: "our model"
    carries_state: ClassVar[bool]  # whether a window's state is handed to the next training step
    default_eval_batch_size: ClassVar[int]  # articles (ours) or windows (a transformer) per forward pass in bench

    # ----- training -----
    @abstractmethod
    def describe(self, training: Mapping[str, Any]) -> str:
        """The model in a few words, for the start-up summary."""

    @abstractmethod
    def build(self, training: Mapping[str, Any], vocab_size: int, quiet: bool) -> nn.Module:
        """A freshly initialised model for a tokenizer of `vocab_size` ids."""

    @abstractmethod
    def config_values(self, model: nn.Module) -> dict[str, Any]:
        """What the run's config.json records as the model."""

    def training_warnings(self, training: Mapping[str, Any], model: nn.Module) -> list[str]:
        """Why these settings will train the model badly, if they will."""
        return []

    def check_resume(self, saved_model: Mapping[str, Any], model: nn.Module, run_dir: Path) -> None:
        """Refuses to resume `run_dir`, whose model was `saved_model`, with a model built otherwise."""

    @abstractmethod
    def load_start_weights(
        self, model: nn.Module, saved_model: Mapping[str, Any], checkpoint: Path, source: str
    ) -> list[str]:
        """Loads the weights of another run's checkpoint into `model` (--init-from); returns the
        model settings that differ there and here ("name old -> new"), refused when the weights do not fit."""

    def prepare(self, model: nn.Module, scan: str) -> nn.Module:
        """The model ready to run on its device with the selective-scan backend `scan` (ours only)."""
        return model

    def save_extras(self, model: nn.Module, checkpoint: Path, weights: dict[str, torch.Tensor]) -> None:
        """Writes what a checkpoint holds besides the trainer's files; `weights`: the whole model's
        state dict (gathered from the shards under FSDP2)."""

    @abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The model's repeated blocks: what FSDP2 shards one by one and activation checkpointing recomputes."""

    # ----- loading and scoring -----
    @abstractmethod
    def load(self, path: Path, device: torch.device) -> nn.Module:
        """The model of a run directory, one of its checkpoint folders, or another folder of this kind."""

    @abstractmethod
    def default_n_ctx(self, model: nn.Module) -> int:
        """EvalSettings.n_ctx of `bakallm bench` without --n-ctx."""

    @abstractmethod
    def reading(self, context: int, reach: int) -> tuple[int, int | None]:
        """(n_ctx, stride) of EvalSettings for scoring with `context` tokens of context at most, for a
        model trained on (or built for) `reach` tokens at a time."""

    @abstractmethod
    def stride(self, settings: EvalSettings) -> int | None:
        """Tokens between the starts of the windows `evaluate` reads with `settings`; None for a model that reads each article once."""

    @abstractmethod
    def evaluate(self, model: nn.Module, corpus: TokenizedCorpus, settings: EvalSettings) -> EvalResult:
        """Scores every article of `corpus`."""

    @abstractmethod
    def answer_log_probs(
        self,
        model: nn.Module,
        samples: Sequence[RecallSample],
        n_ctx: int,
        batch_size: int,
        device: torch.device,
        keep_document_cache: bool,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(log-probabilities at the answer positions, answer) of each recall sample, reading n_ctx tokens of context at most."""

    @abstractmethod
    def window(self, model: nn.Module) -> int | None:
        """Tokens per window of a recurrent model; None for a model that reads n_ctx tokens at a time."""

    @abstractmethod
    def attention_reach(self, model: nn.Module) -> int | None:
        """Tokens attention can see back from a position at most; None: its n_ctx."""

    @abstractmethod
    def vocab_size(self, model: nn.Module) -> int:
        """Token ids the model can read."""

    @abstractmethod
    def architecture_hash(self, model: nn.Module) -> str:
        """A hash of the model's architecture (not its weights), to tell results of the same model apart."""

    @abstractmethod
    def default_tokenizer(
        self, model: nn.Module, path: str | Path, training: Mapping[str, Any]
    ) -> tuple[str | None, str | None]:
        """The tokenizer to read text for the model loaded from `path` with (a spec for
        bakallm.data.tokenizers.load_tokenizer, None when unknown), and a note to print when it
        needs saying; `training`: the run's arguments ({} for a folder that is not a run)."""

    @abstractmethod
    def weight_files(self, model: nn.Module, path: Path) -> list[Path]:
        """The files that `model` was loaded from (by `load(path)`); [] when unknown."""


def model_record(kind: ModelKind, model: nn.Module, name: str, path: str | Path) -> ModelRecord:
    """What result rows record of `model`, loaded by `kind.load(path)`."""
    files = kind.weight_files(model, Path(path))
    counts = model.num_parameters()
    return ModelRecord(
        kind=kind.name,
        name=name,
        checkpoint_path=str(files[0].parent.resolve()) if files else None,
        checkpoint_hash=sha256_files(files),
        params_total=counts["total"],
        params_embedding=counts["embedding"],
        arch_hash=kind.architecture_hash(model),
    )


def kind_named(name: str) -> ModelKind:
    if name not in KINDS:
        raise UserError(f"Unknown model kind {name!r}; use one of {', '.join(KINDS)}.")
    module, class_name = KINDS[name]
    return getattr(importlib.import_module(module), class_name)()


def kind_of_run(training: Mapping[str, Any]) -> ModelKind:
    """The kind of model a run's training arguments train: a transformers one when they name an HF config."""
    return kind_named("hf" if training.get("hf_config") else "bakallm")


def kind_of_path(path: str | Path) -> tuple[ModelKind, dict[str, Any]]:
    """The kind of model a run directory, checkpoint folder or exported folder holds, and the run's
    training arguments ({} for an exported folder)."""
    from bakallm.model.io import is_exported_folder
    from bakallm.runs import read_run_config, resolve_checkpoint

    if is_exported_folder(Path(path)):
        return kind_named("bakallm"), {}
    run_dir, _ = resolve_checkpoint(path)
    training = read_run_config(run_dir).get("training", {})
    return kind_of_run(training), training


def read_model_overrides(path: str | None) -> dict[str, Any]:
    """The fields of a --model-config JSON file, applied over the preset or the HF config ({} without one)."""
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise UserError(f"Model config file {file} does not exist; pass a JSON file of model config fields.")
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(
            f"Model config file {file} is not valid JSON ({error.msg} at line {error.lineno}); fix it."
        ) from None
    if not isinstance(values, dict):
        raise UserError(f"Model config file {file} must hold a JSON object of model config fields.")
    return values
