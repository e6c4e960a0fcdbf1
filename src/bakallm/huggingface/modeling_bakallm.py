"""A bakallm model as a Hugging Face `AutoModelForCausalLM` (loaded with `trust_remote_code=True`).

`bakallm export` copies this file into the exported folder. It only adapts the interface: the
model itself is `bakallm.model.BakaLM`, so the `bakallm` package must be installed
(`pip install bakallm`). Each call reads `input_ids` from the start of the document with a fresh
recurrent state; for long texts and fast decoding use bakallm's own `generate`, which carries the
state instead of re-reading the text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from bakallm.model.config import ModelConfig
from bakallm.model.network import IGNORE_INDEX, BakaLM
from bakallm.model.rotary import rotary_tables


class BakaLMConfig(PretrainedConfig):
    model_type = "bakallm"

    def __init__(self, bakallm: dict | None = None, **kwargs):
        self.bakallm = dict(bakallm or {})  # the fields of bakallm.model.config.ModelConfig
        super().__init__(**kwargs)


class BakaLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BakaLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    # Tied only when config.tie_word_embeddings is true (bakallm's tie_embeddings); stored once.
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

    def __init__(self, config: BakaLMConfig):
        super().__init__(config)
        self.model = BakaLM(ModelConfig.from_dict(config.bakallm))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Every weight comes from model.safetensors. The rotary tables are not stored, and the
        # library may have built the model without data (on the meta device), so they are rebuilt.
        if isinstance(module, BakaLM):
            config = module.config
            cos, sin = rotary_tables(2 * config.layout_length, config.head_dim, config.rope_base, torch.device("cpu"))
            module.register_buffer("rotary_cos", cos, persistent=False)
            module.register_buffer("rotary_sin", sin, persistent=False)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **unused) -> dict:
        # No key-value cache in the library's sense: every step reads the whole text again.
        return {"input_ids": input_ids}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **unused) -> CausalLMOutput:
        """Logits [B, T, vocab]; with `labels` (aligned with input_ids, -100 ignored) the mean
        next-token cross-entropy, as other causal LMs of the library compute it."""
        logits = self.model(input_ids).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        return CausalLMOutput(loss=loss, logits=logits)
