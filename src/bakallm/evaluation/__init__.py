"""Evaluation: whole-article scoring of our models and of Hugging Face baselines (see docs/benchmark.md)."""

from __future__ import annotations

from bakallm.lazy import lazy_exports

# Imported on first use, so that `bakallm bench --help` does not pay for torch or transformers.
_LAZY_EXPORTS = {
    "EvalResult": "bakallm.evaluation.tally",
    "ArticleLossTally": "bakallm.evaluation.tally",
    "evaluate_bakallm": "bakallm.evaluation.evaluate",
    "EvalSettings": "bakallm.evaluation.settings",
    "evaluate_hf": "bakallm.evaluation.hf_baseline",
    "load_hf_model": "bakallm.evaluation.hf_baseline",
}

__all__ = list(_LAZY_EXPORTS)

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
