"""BakaLM: a chunked recurrent language model.

Each window of `window` tokens is laid out as
`[read memory | tokens with pauses | write slots]` and passes through `n_layers` blocks of

    y = x + attn(norm(x)) + mlp(norm(x));  y = y + mamba(norm(y))

The last layer's output at the write slots becomes the next window's read memory; attention
keys/values and the Mamba state are carried too (see docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bakallm.attention import XLAttention, xl_attention_mask
from bakallm.config import ModelConfig
from bakallm.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from bakallm.mamba import Mamba
from bakallm.mlp import GatedMLP
from bakallm.rotary import rotary_tables
from bakallm.state import RecurrentState


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab_size], or None when not asked for
    loss: torch.Tensor | None  # mean cross-entropy over targets != -100
    state: RecurrentState
    n_targets: torch.Tensor | None = None  # how many targets the loss averages over


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = XLAttention(config.d_model, config.n_heads)
        self.mlp = GatedMLP(config.d_model, config.d_ff, config.elephant_a, config.elephant_d)
        self.mamba_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps) if config.mamba else None
        self.mamba = (
            Mamba(config.d_model, config.mamba_d_state, config.mamba_d_conv, config.mamba_expand, config.dt_rank)
            if config.mamba
            else None
        )

    def forward(self, x, past_key, past_value, mask, cos, sin, conv_state, ssm_state):
        normed = self.norm(x)
        attended, key, value = self.attn(normed, past_key, past_value, mask, cos, sin)
        x = x + attended + self.mlp(normed)
        if self.mamba is not None:
            mixed, conv_state, ssm_state = self.mamba(self.mamba_norm(x), conv_state, ssm_state)
            x = x + mixed
        return x, key, value, conv_state, ssm_state


class BakaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.embed = nn.Embedding(config.padded_vocab_size, d_model)
        self.pause = nn.Parameter(torch.zeros(config.n_pauses, d_model))
        self.initial_memory = nn.Parameter(torch.zeros(config.n_memory, d_model))
        self.write_slots = nn.Parameter(torch.zeros(config.n_memory, d_model))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.RMSNorm(d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(2 * config.layout_length, config.head_dim, config.rope_base, torch.device("cpu"))
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters()

    # ----- parameters -----
    def reset_parameters(self) -> None:
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):
                    is_residual_output = name.endswith(("attn.out", "mlp.down", "mamba.out_proj"))
                    module.weight.normal_(0.0, residual_std if is_residual_output else std)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):
                    module.weight.normal_(0.0, std)
            for parameter in (self.pause, self.initial_memory, self.write_slots):
                parameter.normal_(0.0, std)
            for layer in self.layers:
                if layer.mamba is not None:
                    layer.mamba.reset_dt_projection()

    def num_parameters(self) -> dict[str, int]:
        """Total parameter count and the part in the token embedding and output projection."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "BakaLM":
        """The model of a run directory (its latest checkpoint) or of one checkpoint folder."""
        from bakallm.training.checkpoint import load_model

        return load_model(path, device=device)

    # ----- state -----
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        """A fresh state for every row: zero caches of full-window size and no past."""
        config = self.config
        device = device if device is not None else self.embed.weight.device
        cache_shape = (batch_size, config.n_heads, config.cache_length, config.head_dim)
        mamba_states = [layer.mamba.initial_state(batch_size, device) for layer in self.layers if layer.mamba is not None]
        return RecurrentState(
            memory=torch.zeros(batch_size, config.n_memory, config.d_model, device=device),
            keys=tuple(torch.zeros(cache_shape, device=device) for _ in self.layers),
            values=tuple(torch.zeros(cache_shape, device=device) for _ in self.layers),
            conv=tuple(conv for conv, _ in mamba_states),
            ssm=tuple(ssm for _, ssm in mamba_states),
            has_past=torch.zeros(batch_size, dtype=torch.bool, device=device),
        )

    # ----- forward -----
    def forward(
        self,
        input_ids: torch.Tensor,
        state: RecurrentState | None = None,
        reset: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Runs ceil(T / window) windows over input_ids [B, T]; the last may be partial.

        targets[:, t] is the token that should follow input_ids[:, t] (-100: not scored).
        """
        self._check_inputs(input_ids, state, reset, targets)
        batch, length = input_ids.shape
        if state is None:
            state = self.init_state(batch, input_ids.device)
        if reset is not None:
            state = state.reset(reset)
        window = self.config.window
        window_logits = []
        loss_sum = None
        for start in range(0, length, window):
            hidden, state = self._window(input_ids[:, start : start + window], state)
            if targets is not None:
                # In chunks of tokens: the window's float32 logits never all exist at once.
                window_loss = linear_cross_entropy(
                    hidden.flatten(0, 1), self.lm_head.weight, targets[:, start : start + window].flatten(), self.config.vocab_size
                )
                loss_sum = window_loss if loss_sum is None else loss_sum + window_loss
            if return_logits:
                window_logits.append(self.lm_head(hidden)[..., : self.config.vocab_size])
        loss = n_targets = None
        if targets is not None:
            n_targets = (targets != IGNORE_INDEX).sum()
            loss = loss_sum / n_targets.clamp(min=1)
        all_logits = (window_logits[0] if len(window_logits) == 1 else torch.cat(window_logits, dim=1)) if return_logits else None
        return ModelOutput(logits=all_logits, loss=loss, state=state, n_targets=n_targets)

    def _window(self, input_ids: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """(final-normed hidden states of the window's tokens [B, T, d_model], the state after it)."""
        config = self.config
        batch = input_ids.shape[0]
        tokens = self.embed(input_ids)
        body, token_positions = self._insert_pauses(tokens)
        dtype = body.dtype
        memory = torch.where(state.has_past.view(batch, 1, 1), state.memory.to(dtype), self.initial_memory.to(dtype))
        x = torch.cat((memory, body, self.write_slots.to(dtype).expand(batch, -1, -1)), dim=1)
        length = x.shape[1]
        past_length = state.keys[0].shape[2]
        mask = xl_attention_mask(state.has_past, past_length, length)
        cos, sin = self.rotary_cos[: past_length + length], self.rotary_sin[: past_length + length]
        keys, values, convs, ssms = [], [], [], []
        for index, layer in enumerate(self.layers):
            conv_state = ssm_state = None
            if layer.mamba is not None:
                conv_state, ssm_state = state.conv[index], state.ssm[index]
                if not config.carry_mamba_state:
                    conv_state, ssm_state = torch.zeros_like(conv_state), torch.zeros_like(ssm_state)
            x, key, value, conv_state, ssm_state = layer(
                x, state.keys[index], state.values[index], mask, cos, sin, conv_state, ssm_state
            )
            # Contiguous float32 caches: the same strides and dtype in every window, so a compiled
            # block sees identical inputs and never recompiles.
            keys.append(key[:, :, : config.cache_length].float().contiguous())
            values.append(value[:, :, : config.cache_length].float().contiguous())
            if layer.mamba is not None:
                convs.append(conv_state.contiguous())
                ssms.append(ssm_state.contiguous())
        new_state = RecurrentState(
            memory=x[:, length - config.n_memory :].float(),
            keys=tuple(keys),
            values=tuple(values),
            conv=tuple(convs),
            ssm=tuple(ssms),
            has_past=torch.ones_like(state.has_past),
        )
        hidden = x.index_select(1, token_positions + config.n_memory)
        return self.final_norm(hidden), new_state

    def _insert_pauses(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Puts pause k before token k*spacing; returns the body and each token's index in it."""
        batch, length, d_model = tokens.shape
        positions = torch.arange(length, device=tokens.device)
        if self.config.n_pauses == 0:
            return tokens, positions
        spacing = self.config.pause_spacing
        groups = -(-length // spacing)
        padded = F.pad(tokens, (0, 0, 0, groups * spacing - length)).view(batch, groups, spacing, d_model)
        pauses = self.pause[:groups].to(tokens.dtype).view(1, groups, 1, d_model).expand(batch, -1, -1, -1)
        body = torch.cat((pauses, padded), dim=2).view(batch, groups * (spacing + 1), d_model)[:, : groups + length]
        return body, positions + positions // spacing + 1

    def _check_inputs(self, input_ids, state, reset, targets) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a 2-D tensor [batch, tokens], got {shape}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}.")
        batch, length = input_ids.shape
        if batch == 0 or length == 0:
            raise ValueError(f"input_ids must hold at least one row and one token, got shape {tuple(input_ids.shape)}.")
        vocab = self.config.vocab_size
        if input_ids.device.type == "cpu":
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise ValueError(
                    f"input_ids hold ids from {low} to {high}, outside the model's vocabulary [0, {vocab}); use the tokenizer the model was built for."
                )
        else:
            # No host synchronisation on accelerators: a device-side assert instead.
            torch._assert_async(((input_ids >= 0) & (input_ids < vocab)).all(), "input_ids outside the model's vocabulary")
        if reset is not None and (not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != (batch,)):
            got = f"{tuple(reset.shape)} {reset.dtype}" if isinstance(reset, torch.Tensor) else type(reset).__name__
            raise ValueError(f"reset must be a bool tensor of shape [{batch}] (one flag per row), got {got}.")
        if state is not None and state.batch_size != batch:
            raise ValueError(f"state holds {state.batch_size} rows but input_ids has {batch}; pass a state from init_state({batch}).")
        if targets is not None and (not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(input_ids.shape)):
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {got}.")
