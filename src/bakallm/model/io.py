"""A model on disk: `load_model`, and the files of a run, a checkpoint or an exported folder.

Where the files are and what they hold lives in files.py, which knows no model class, so that the
network can load itself (`BakaLM.from_pretrained`) without importing this module: imports run one
way, io -> network -> files. The names of files.py are re-exported here, where the rest of bakallm
has always imported them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bakallm.model.files import (  # noqa: F401 (re-exported)
    HF_CONFIG_KEY,
    HF_MODEL_TYPE,
    HF_TOKENIZER_KEY,
    HF_WEIGHT_PREFIX,
    MODEL_FILE,
    ModelFiles,
    is_exported_folder,
    load_weights,
    model_files,
)
from bakallm.model.network import BakaLM


def load_model(path: str | Path, device: str | torch.device = "cpu") -> BakaLM:
    """The BakaLM of a run directory (latest checkpoint), a checkpoint folder or an exported folder."""
    return BakaLM.from_pretrained(path, device)
