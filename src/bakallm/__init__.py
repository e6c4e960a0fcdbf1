"""bakallm: small long-context recurrent language models (attention + Mamba + RMT memory)."""

from __future__ import annotations

from bakallm.lazy import lazy_exports

__version__ = "0.1.0"

# Imported on first use, so that light modules (errors, the CLI's help) do not pay for torch.
_LAZY_EXPORTS = {
    "ModelConfig": "bakallm.model.config",
    "RecurrentState": "bakallm.model.state",
    "BakaLM": "bakallm.model.network",
    "ModelOutput": "bakallm.model.network",
}

__all__ = [*_LAZY_EXPORTS, "__version__"]

__getattr__ = lazy_exports(__name__, _LAZY_EXPORTS)
