"""bakallm: small long-context recurrent language models (attention + Mamba + RMT memory)."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so that light modules (errors, the CLI's help) do not pay for torch.
_LAZY_EXPORTS = {
    "ModelConfig": "bakallm.config",
    "RecurrentState": "bakallm.state",
    "BakaLM": "bakallm.model",
    "ModelOutput": "bakallm.model",
}

__all__ = [*_LAZY_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'bakallm' has no attribute {name!r}")
