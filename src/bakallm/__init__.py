"""bakallm: small long-context recurrent language models (attention + Mamba + RMT memory)."""

__version__ = "0.1.0"

from bakallm.config import ModelConfig  # noqa: E402
from bakallm.state import RecurrentState  # noqa: E402
from bakallm.model import BakaLM, ModelOutput  # noqa: E402

__all__ = ["ModelConfig", "RecurrentState", "BakaLM", "ModelOutput", "__version__"]
