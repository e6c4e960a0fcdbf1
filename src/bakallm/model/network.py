"""BakaLM: a chunked recurrent language model.

Each window of `window` tokens is laid out as
`[read memory | tokens with pauses | write slots]` and passes through `n_layers` blocks of

    y = x + attn(norm(x)) + mlp(norm(x));  y = y + mamba(norm(y))

The last layer's output at the write slots becomes the next window's read memory; attention
keys/values and the Mamba state are carried too (see docs/architecture.md). ModelConfig fields
switch each part to the reference system's variant instead (norm, pauses, memory layout and
read-out, initialisation, which layers have Mamba).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bakallm.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from bakallm.model.attention import XLAttention, xl_attention_mask
from bakallm.model.config import ModelConfig
from bakallm.model.document_cache import DocumentCache
from bakallm.model.mamba import Mamba
from bakallm.model.mlp import GatedMLP
from bakallm.model.rotary import rotary_tables
from bakallm.model.state import RecurrentState


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab_size], or None when not asked for
    loss: torch.Tensor | None  # mean cross-entropy over targets != -100
    state: RecurrentState
    n_targets: torch.Tensor | None = None  # how many targets the loss averages over
    token_losses: torch.Tensor | None = None  # [B, T] each target's loss (0 where -100), without gradient


def scored_positions(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [N, d] and targets [N] at the scored positions only, and those positions (None: all
    are kept). On a CPU only: where most positions are not targets (a sparse recall recipe, padding)
    the output layer then runs on far fewer rows, and finding them needs the host, which on a CPU
    costs nothing; an accelerator keeps every row rather than wait for the host."""
    if hidden.device.type != "cpu":
        return hidden, targets, None
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    if len(scored) == len(targets):
        return hidden, targets, None
    return hidden.index_select(0, scored), targets.index_select(0, scored), scored


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return nn.RMSNorm(config.d_model, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, with_mamba: bool):
        super().__init__()
        self.norm = make_norm(config)
        self.attn = XLAttention(config.d_model, config.n_heads)
        self.mlp = GatedMLP(config.d_model, config.d_ff, config.elephant_a, config.elephant_d)
        self.mamba_norm = make_norm(config) if with_mamba else None
        self.mamba = (
            Mamba(config.d_model, config.mamba_d_state, config.mamba_d_conv, config.mamba_expand, config.dt_rank, config.mamba_dt_min)
            if with_mamba
            else None
        )

    def forward(self, x, past_key, past_value, mask, cos, sin, conv_state, ssm_state):
        normed = self.norm(x)
        attended, key, value = self.attn(normed, past_key, past_value, mask, cos, sin)
        x = x + attended + self.mlp(normed)
        if self.mamba is not None:
            # One position (token-by-token decoding) takes the direct state update instead of a scan.
            mix = self.mamba.step if x.shape[1] == 1 else self.mamba
            mixed, conv_state, ssm_state = mix(self.mamba_norm(x), conv_state, ssm_state)
            x = x + mixed
        return x, key, value, conv_state, ssm_state


class BakaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.embed = nn.Embedding(config.padded_vocab_size, d_model)
        n_pause_vectors = min(config.n_pauses, 1) if config.pause_embedding == "shared" else config.n_pauses
        self.pause = nn.Parameter(torch.zeros(n_pause_vectors, d_model))
        # The reference layout has no read slots in a fresh window, so it learns no initial memory.
        self.initial_memory = nn.Parameter(torch.zeros(config.n_memory, d_model)) if config.memory_layout == "learned_slots" else None
        self.write_slots = nn.Parameter(torch.zeros(config.n_memory, d_model))
        self.layers = nn.ModuleList(Block(config, config.has_mamba(index)) for index in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(d_model, config.padded_vocab_size, bias=False)
        self.document_cache = DocumentCache(d_model, config.vocab_size, config.document_cache_order) if config.document_cache else None
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(2 * config.layout_length, config.head_dim, config.rope_base, torch.device("cpu"))
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.reset_parameters()

    # ----- parameters -----
    def reset_parameters(self) -> None:
        if self.config.init == "pytorch_default":
            self._reset_pytorch_default()
            return
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
            for parameter in self._slot_vectors():
                parameter.normal_(0.0, std)
        self._reset_special_parameters()

    def _reset_pytorch_default(self) -> None:
        """The reference's initialisation: each module's own default, slot vectors N(0, 1)."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    module.reset_parameters()
            for parameter in self._slot_vectors():
                parameter.normal_(0.0, 1.0)
        self._reset_special_parameters()

    def _slot_vectors(self) -> list[nn.Parameter]:
        return [parameter for parameter in (self.pause, self.initial_memory, self.write_slots) if parameter is not None]

    def _reset_special_parameters(self) -> None:
        """Mamba's step-size projections and the document cache's gate, which both schemes start alike."""
        for layer in self.layers:
            if layer.mamba is not None:
                layer.mamba.reset_dt_projection()
        if self.document_cache is not None:
            self.document_cache.reset_parameters()

    def num_parameters(self) -> dict[str, int]:
        """Total parameter count and the part in the token embedding and output projection."""
        total = sum(p.numel() for p in self.parameters())
        embedding = self.embed.weight.numel() + (0 if self.config.tie_embeddings else self.lm_head.weight.numel())
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "BakaLM":
        """The model of a run directory (its latest checkpoint), one checkpoint folder, or a folder
        written by `bakallm export`."""
        from bakallm.model.io import load_model

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
            **(self.document_cache.initial_state(batch_size, device) if self.document_cache is not None else {}),
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
        window_logits, window_token_losses = [], []
        loss_sum = None
        for start in range(0, length, window):
            window_ids = input_ids[:, start : start + window]
            before = state
            hidden, state = self.run_window(window_ids, state)
            if targets is None and not return_logits:
                continue
            hidden = self.final_norm(hidden)
            if targets is not None:
                window_targets = targets[:, start : start + window]
                mixture = None
                if self.document_cache is not None:
                    mixture = self.document_cache.target_mixture(hidden, before, window_ids, window_targets)
                window_loss, token_losses = self._window_cross_entropy(hidden.flatten(0, 1), window_targets.flatten(), mixture)
                loss_sum = window_loss if loss_sum is None else loss_sum + window_loss
                window_token_losses.append(token_losses.view(window_targets.shape))
            if return_logits:
                logits = self.lm_head(hidden)[..., : self.config.vocab_size]
                if self.document_cache is not None:
                    logits = self.document_cache.window_log_probs(hidden, logits, before, window_ids)
                window_logits.append(logits)
        loss = n_targets = token_losses = None
        if targets is not None:
            n_targets = (targets != IGNORE_INDEX).sum()
            loss = loss_sum / n_targets.clamp(min=1)
            token_losses = torch.cat(window_token_losses, dim=1)
        all_logits = (window_logits[0] if len(window_logits) == 1 else torch.cat(window_logits, dim=1)) if return_logits else None
        return ModelOutput(logits=all_logits, loss=loss, state=state, n_targets=n_targets, token_losses=token_losses)

    def _window_cross_entropy(
        self, hidden: torch.Tensor, targets: torch.Tensor, mixture: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of a window's targets [N] from its final hidden states [N, d], and each
        target's loss [N], in chunks of tokens: the window's float32 logits never all exist at once."""
        n_positions = len(targets)
        hidden, targets, scored = scored_positions(hidden, targets)
        if scored is not None and mixture is not None:
            mixture = tuple(part.index_select(0, scored) for part in mixture)
        loss, token_losses = linear_cross_entropy(
            hidden, self.lm_head.weight, targets, self.config.vocab_size, mixture=mixture, return_token_losses=True
        )
        if scored is not None:
            token_losses = token_losses.new_zeros(n_positions).index_copy(0, scored, token_losses)
        return loss, token_losses

    def run_window(self, input_ids: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, RecurrentState]:
        """One whole window (or the last, partial one): the last layer's output at its tokens
        [B, n, d] (before the final norm) and the state it commits."""
        body, token_positions = self.embed_window_tokens(input_ids, first=0)
        x, read_length, hidden_read_slots = self._memory_layout(body, state)
        convs, ssms = self.window_mamba_state(state)
        x, keys, values, convs, ssms = self.run_positions(x, state, (), (), convs, ssms, hidden_keys=hidden_read_slots)
        new_state = self.commit_window(x, keys, values, convs, ssms, state)
        if self.document_cache is not None:
            new_state = self.document_cache.read(new_state, input_ids)
        return x.index_select(1, token_positions + read_length), new_state

    def _memory_layout(self, body: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """The window's full input `[read slots | body | write slots]`, the number of read slots, and
        an attention mask [B, 1, L, L_past + L] of read slots hidden from their row (or None)."""
        batch, dtype, n_memory = body.shape[0], body.dtype, self.config.n_memory
        has_past = state.has_past.view(batch, 1, 1)
        write = self.write_slots.to(dtype).expand(batch, -1, -1)
        if self.config.memory_layout == "learned_slots":
            return torch.cat((self.read_memory(state, dtype), body, write), dim=1), n_memory, None
        # The reference layout: a fresh window has no read slots, a later one reads the memory and
        # writes into a copy of it. Exact when all rows agree (one host synchronisation to check).
        memory = state.memory.to(dtype)
        if not bool(state.has_past.any()):
            return torch.cat((body, write), dim=1), 0, None
        if bool(state.has_past.all()):
            return torch.cat((memory, body, memory), dim=1), n_memory, None
        # Rows of both kinds share one call: fresh rows get zero read slots that none of their
        # positions but the slot itself attends to (see docs/architecture.md on this approximation).
        x = torch.cat((torch.where(has_past, memory, 0.0), body, torch.where(has_past, memory, write)), dim=1)
        length, past_length = x.shape[1], state.keys[0].shape[2]
        key_positions = torch.arange(past_length + length, device=x.device)
        query_positions = torch.arange(length, device=x.device).view(-1, 1)
        hidden_slot = (key_positions >= past_length) & (key_positions < past_length + n_memory) & (key_positions != query_positions + past_length)
        return x, n_memory, hidden_slot & ~state.has_past.view(batch, 1, 1, 1)

    # ----- the pieces of a window, shared with incremental decoding (bakallm.generation) -----
    def read_memory(self, state: RecurrentState, dtype: torch.dtype) -> torch.Tensor:
        """The first n_memory positions of a `learned_slots` window [B, M, d]: the carried memory,
        or the learned initial memory for rows without a past (and for every row when the memory is not carried)."""
        batch = state.batch_size
        initial = self.initial_memory.to(dtype)
        if not self.config.carry_memory:
            return initial.expand(batch, -1, -1)
        return torch.where(state.has_past.view(batch, 1, 1), state.memory.to(dtype), initial)

    def embed_window_tokens(self, input_ids: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeds tokens `first`, `first`+1, ... of a window and puts pause k before token
        k * pause_step (k < n_pauses).

        Returns the body [B, n, d] (these tokens and the pauses that fall among them, starting
        with the pause before token `first` if there is one) and each token's index in it.
        """
        config = self.config
        tokens = self.embed(input_ids)
        batch, length, d_model = tokens.shape
        indices = torch.arange(first, first + length, device=tokens.device)
        if config.n_pauses == 0:
            return tokens, indices - first
        step, n_pauses = config.pause_step, config.n_pauses
        last = first + length - 1
        first_pause = -(-first // step)
        body_start = first + min(first_pause, n_pauses)  # the body index of the pause before `first`, or of `first`
        body_length = last + min(last // step + 1, n_pauses) + 1 - body_start
        token_positions = indices + torch.clamp(indices // step + 1, max=n_pauses) - body_start
        pause_numbers = torch.arange(first_pause, min(last // step, n_pauses - 1) + 1, device=tokens.device)
        pause_rows = pause_numbers if self.pause.shape[0] > 1 else torch.zeros_like(pause_numbers)  # one shared vector
        body = tokens.new_zeros(batch, body_length, d_model).index_copy(1, token_positions, tokens)
        pauses = self.pause.to(tokens.dtype).index_select(0, pause_rows).expand(batch, -1, -1)
        return body.index_copy(1, pause_numbers * (step + 1) - body_start, pauses), token_positions

    def window_mamba_state(self, state: RecurrentState) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The (conv, ssm) states each Mamba layer starts a window from: carried, or zero."""
        if self.config.carry_mamba_state:
            return state.conv, state.ssm
        return tuple(map(torch.zeros_like, state.conv)), tuple(map(torch.zeros_like, state.ssm))

    def run_positions(
        self,
        x: torch.Tensor,
        state: RecurrentState,
        window_keys: tuple[torch.Tensor, ...],
        window_values: tuple[torch.Tensor, ...],
        convs: tuple[torch.Tensor, ...],
        ssms: tuple[torch.Tensor, ...],
        hidden_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Runs positions x [B, L, d] of a window through every layer.

        They follow the window's earlier positions, whose keys and values per layer are
        `window_keys`/`window_values` (empty tuples at the window's start), and attend to those and
        to the previous window's cache in `state`, except where `hidden_keys` (a mask like
        `xl_attention_mask`'s) is True. Returns the last layer's output, the keys and values of
        these positions, and the Mamba states after them.
        """
        length = x.shape[1]
        past_length = state.keys[0].shape[2]
        prefix = window_keys[0].shape[2] if window_keys else 0
        mask = xl_attention_mask(state.has_past, past_length, length, prefix)
        if hidden_keys is not None:
            mask = mask & ~hidden_keys
        total = past_length + prefix + length
        cos, sin = self.rotary_cos[:total], self.rotary_sin[:total]
        keys, values, new_convs, new_ssms = [], [], [], []
        mamba_index = 0
        for index, layer in enumerate(self.layers):
            past_key, past_value = state.keys[index], state.values[index]
            if window_keys:
                past_key = torch.cat((past_key.to(window_keys[index].dtype), window_keys[index]), dim=2)
                past_value = torch.cat((past_value.to(window_values[index].dtype), window_values[index]), dim=2)
            conv_state = ssm_state = None
            if layer.mamba is not None:
                conv_state, ssm_state = convs[mamba_index], ssms[mamba_index]
                mamba_index += 1
            x, key, value, conv_state, ssm_state = layer(x, past_key, past_value, mask, cos, sin, conv_state, ssm_state)
            keys.append(key)
            values.append(value)
            if layer.mamba is not None:
                new_convs.append(conv_state.contiguous())
                new_ssms.append(ssm_state.contiguous())
        return x, keys, values, tuple(new_convs), tuple(new_ssms)

    def commit_window(
        self,
        x: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        convs: tuple[torch.Tensor, ...],
        ssms: tuple[torch.Tensor, ...],
        state: RecurrentState,
    ) -> RecurrentState:
        """The state a window hands on: the last layer's output at the memory read-out (the write
        slots, the last n_memory positions of x; or the seed's first slots), its keys and values
        per layer, and the Mamba states after it."""
        config = self.config
        memory = x[:, : config.n_memory] if config.memory_readout == "first_slots" else x[:, x.shape[1] - config.n_memory :]
        # Contiguous float32 caches: the same strides and dtype in every window, so a compiled
        # block sees identical inputs and never recompiles. The document cache's fields pass through.
        return dataclasses.replace(
            state,
            memory=memory.float(),
            keys=tuple(key[:, :, : config.cache_length].float().contiguous() for key in keys),
            values=tuple(value[:, :, : config.cache_length].float().contiguous() for value in values),
            conv=convs,
            ssm=ssms,
            has_past=torch.ones_like(state.has_past),
        )

    def logits(self, hidden: torch.Tensor, state: RecurrentState | None = None) -> torch.Tensor:
        """Next-token logits [..., vocab_size] from the last layer's output at token positions; with
        the document cache, the mixture's log-probabilities [B, vocab_size] for the token after
        everything `state` has read, from hidden [B, d_model] there."""
        normed = self.final_norm(hidden)
        logits = self.lm_head(normed)[..., : self.config.vocab_size]
        return logits if self.document_cache is None else self.document_cache.mix(normed, logits, state)

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
