"""Hugging Face causal LMs as baselines, scored on exactly the tokens our models score.

A transformer sees at most n_ctx tokens, so each article is read in overlapping windows (the
reference's sliding-window method): a window is n_ctx input tokens; the first window of an article
scores every prediction it makes, each later one, `stride` tokens further on, scores only the
predictions the previous windows did not make. Every token but an article's first is thus scored
exactly once, with at least n_ctx - stride tokens of context once past the first window.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bakallm.data.corpora import hub_revision
from bakallm.data.token_cache import TokenizedCorpus
from bakallm.errors import UserError
from bakallm.evaluation.articles import (
    article_length,
    input_target_pairs,
    require_positive,
    require_vocabulary_fits,
    scorable_articles,
    scoring_progress,
)
from bakallm.evaluation.memory import PeakMemory
from bakallm.evaluation.settings import EvalSettings
from bakallm.evaluation.tally import ArticleLossTally, EvalResult, token_nll
from bakallm.model.network import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_LOCAL_MODEL_ADVICE = "pass the path of a local folder holding the model's config.json and weights"
# Metadata that changes with the transformers version or with how the model was loaded, not with its architecture.
_CONFIG_KEYS_NOT_ARCHITECTURE = frozenset({"transformers_version", "torch_dtype", "dtype"})


@dataclass(frozen=True)
class HFWindow:
    """Inputs at positions [start, stop) of an article; the predictions of inputs [first_scored, stop) count."""

    article: int
    start: int
    stop: int
    first_scored: int


def hf_windows(article: int, n_tokens: int, n_ctx: int, stride: int) -> Iterator[HFWindow]:
    """The windows of an article of `n_tokens` tokens; every input position is scored by exactly one."""
    n_inputs = n_tokens - 1
    scored_until = 0
    for start in range(0, n_inputs, stride):
        stop = min(start + n_ctx, n_inputs)
        yield HFWindow(article, start, stop, first_scored=scored_until)
        scored_until = stop
        if stop == n_inputs:
            return


def default_stride(n_ctx: int) -> int:
    return max(n_ctx // 2, 1)


def load_hf_model(name_or_path: str | Path, device: torch.device | str = "cpu") -> PreTrainedModel:
    """A causal LM in float32 from a local folder or the Hub (or the Hub's local cache when offline)."""
    from transformers import AutoModelForCausalLM

    spec = str(name_or_path)
    local = Path(spec).expanduser()
    hub_unreachable: UserError | None = None
    if local.is_dir():
        source, options = str(local), {}
    elif local.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise UserError(
            f"No model folder at {spec}; {_LOCAL_MODEL_ADVICE}, or a Hub name such as EleutherAI/pythia-70m-deduped."
        )
    else:
        source = spec
        try:
            options = {"revision": hub_revision(spec, "model", _LOCAL_MODEL_ADVICE)}
        except UserError as error:
            # Offline, a model that an earlier run downloaded is as good as a fresh one.
            hub_unreachable, options = error, {"local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **options)
    except (OSError, ValueError, KeyError) as error:
        if hub_unreachable is not None:
            raise hub_unreachable from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"Could not load a causal language model from {spec} ({reason}); {_LOCAL_MODEL_ADVICE}."
        ) from None
    return model.to(device).eval()


def hf_model_folder(model: PreTrainedModel) -> Path | None:
    """The folder the model was read from: the local path, or its snapshot in the Hub cache."""
    source = Path(model.name_or_path).expanduser()
    if source.is_dir():
        return source.resolve()
    from huggingface_hub import try_to_load_from_cache

    cached_config = try_to_load_from_cache(model.name_or_path, "config.json")
    return Path(cached_config).parent if isinstance(cached_config, str) else None


def hf_weight_files(folder: Path) -> list[Path]:
    """The weights transformers reads from `folder`: its safetensors files, else its .bin files."""
    safetensors = sorted(folder.glob("*.safetensors"))
    return safetensors or sorted(folder.glob("*.bin"))


def hf_parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Total parameters, and those of the input embedding and output head (counted once when tied)."""
    total = sum(parameter.numel() for parameter in model.parameters())
    matrices = {
        id(module.weight): module.weight.numel()
        for module in (model.get_input_embeddings(), model.get_output_embeddings())
    }
    return {"total": total, "embedding": sum(matrices.values())}


def hf_architecture_hash(model: PreTrainedModel) -> str:
    # Keys starting with _ are loading details such as _name_or_path.
    values = {
        key: value
        for key, value in model.config.to_dict().items()
        if key not in _CONFIG_KEYS_NOT_ARCHITECTURE and not key.startswith("_")
    }
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def hf_vocab_size(model: PreTrainedModel) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def evaluate_hf(model: str | Path | PreTrainedModel, corpus: TokenizedCorpus, settings: EvalSettings) -> EvalResult:
    """Scores every article of `corpus` with a Hugging Face causal LM: a name or path, or a model already on `settings.device`.

    Windows of n_ctx tokens advance by `stride` (default n_ctx / 2); windows of several articles
    share a forward pass, right-padded, which leaves the scores unchanged because a causal model's
    real tokens never look at the padding after them.
    """
    n_ctx, batch_size = settings.n_ctx, settings.batch_size
    require_positive("n_ctx", n_ctx)
    stride = default_stride(n_ctx) if settings.stride is None else settings.stride
    if not 1 <= stride <= n_ctx:
        raise UserError(f"The stride must lie between 1 and n_ctx ({n_ctx}), got {stride}.")
    require_positive("The batch size", batch_size)
    device = torch.device(settings.device)
    if isinstance(model, (str, Path)):
        model = load_hf_model(model, device)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and n_ctx > max_positions:
        raise UserError(
            f"n_ctx {n_ctx} exceeds the {max_positions} positions the model was built for; pass an n_ctx of at most {max_positions}."
        )
    require_vocabulary_fits(corpus.vocab_size, hf_vocab_size(model))
    tally = ArticleLossTally(len(corpus), settings.position_buckets)
    windows = (
        window
        for article in scorable_articles(corpus).tolist()
        for window in hf_windows(article, article_length(corpus, article), n_ctx, stride)
    )
    memory = PeakMemory(device)
    started = time.perf_counter()
    with (
        torch.inference_mode(),
        scoring_progress(corpus, settings.progress) as bar,
    ):
        while batch := list(islice(windows, batch_size)):
            input_ids, attention_mask, targets = _window_batch(corpus, batch)
            targets = targets.to(device)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            positions = torch.tensor([window.start for window in batch])[:, None] + torch.arange(input_ids.shape[1])
            bar.update(
                tally.add(
                    [window.article for window in batch], token_nll(logits, targets), targets != IGNORE_INDEX, positions
                )
            )
    return tally.result(corpus, time.perf_counter() - started, memory.peak_bytes())


def _window_batch(corpus: TokenizedCorpus, windows: list[HFWindow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs, attention mask and targets [B, T] (IGNORE_INDEX where not scored)."""
    length = max(window.stop - window.start for window in windows)
    input_ids = torch.zeros(len(windows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(windows), length, dtype=torch.long)
    targets = torch.full((len(windows), length), IGNORE_INDEX, dtype=torch.long)
    for row, window in enumerate(windows):
        inputs, next_tokens = input_target_pairs(corpus, window.article, window.start, window.stop)
        scored_from = window.first_scored - window.start
        input_ids[row, : len(inputs)] = inputs
        attention_mask[row, : len(inputs)] = 1
        targets[row, scored_from : len(inputs)] = next_tokens[scored_from:]
    return input_ids, attention_mask, targets
