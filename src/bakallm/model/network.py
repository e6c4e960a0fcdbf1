"""BakaLM: a chunked recurrent language model.

Each window of `window` tokens is laid out as
`[read memory | tokens with pauses | write slots]` and passes through `n_layers` blocks of

    y = x + attn(norm(x)) + mlp(norm(x));  y = y + mamba(norm(y))

The last layer's output at the write slots becomes the next window's read memory; attention
keys/values and the Mamba state are carried too (see docs/architecture.md). Windows are read by
the window runtime (model/window.py), which forward calls and incremental decoding share. ModelConfig fields
switch each part to the reference system's variant instead (norm, pauses, memory layout and
read-out, initialisation, which layers have Mamba).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bakallm.kernels.cpu_fused import cpu_kernels_for
from bakallm.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy
from bakallm.model.attention import XLAttention
from bakallm.model.config import ModelConfig
from bakallm.model.document_cache import DocumentCache
from bakallm.model.files import load_weights, model_files
from bakallm.model.mamba import Mamba
from bakallm.model.mlp import GatedMLP
from bakallm.model.rotary import rotary_tables
from bakallm.model.state import RecurrentState
from bakallm.model.window import LayerState, WindowReader


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, vocab_size], or None when not asked for
    loss: torch.Tensor | None  # mean cross-entropy over targets != -100
    state: RecurrentState
    n_targets: torch.Tensor | None = None  # how many targets the loss averages over
    token_losses: torch.Tensor | None = None  # [B, T] each target's loss (0 where -100), without gradient


def scored_positions(
    hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
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


class _CompiledRMSNorm(torch.autograd.Function):
    """RMSNorm through the compiled CPU kernels (kernels/cpu_fused.py): one pass forward, one backward."""

    @staticmethod
    def forward(ctx, x, weight, eps, kernel):
        y, rstd = kernel.rms_norm_forward(x, weight, eps)
        ctx.kernel = kernel
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = ctx.kernel.rms_norm_backward(grad.contiguous(), x, weight, rstd)
        return grad_x, grad_weight, None, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, same values within rounding) computed, where it can, by the
    compiled CPU kernels (kernels/cpu_fused.py): nn.RMSNorm's CPU path is a composite of PyTorch
    operations forward and backward. Elsewhere, a float32 input without gradients takes the plain
    formula: the composite makes 24 operator calls where the formula makes 8 and takes three
    quarters of its time, which shows in token-by-token decoding; bitwise the same result
    (tests/test_window.py). With gradients or other dtypes, off the CPU, it is nn.RMSNorm's own."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight is None or self.eps is None or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        kernel = cpu_kernels_for(x, weight)
        if kernel is not None:
            if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                return _CompiledRMSNorm.apply(x, weight, self.eps, kernel)
            return kernel.rms_norm_forward(x, weight, self.eps)[0]
        if (
            torch.is_grad_enabled()
            or x.dtype != torch.float32
            or weight.dtype != torch.float32
            or torch.compiler.is_compiling()
        ):
            return super().forward(x)
        # The width and eps as float32 tensors: Python numbers would be wrapped and cast at every call.
        constants = self._constants.get(x.device)
        if constants is None:
            constants = self._constants[x.device] = (
                torch.tensor(float(x.shape[-1]), device=x.device),
                torch.tensor(self.eps, device=x.device),
            )
        width, eps = constants
        return x * torch.rsqrt((x * x).sum(-1, keepdim=True).div_(width).add_(eps)) * weight


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.d_model, eps=config.norm_eps)
    return RMSNorm(config.d_model, eps=config.norm_eps)


# Up to this many positions, a piece of a window read in pieces runs Mamba's recurrence token by
# token: on one CPU thread that is 3 to 12 times faster than the blocked scan for 2 to 18 positions
# (d_inner 256 and 1536), and the blocked scan wins from about 24 positions at d_inner 256.
SEQUENTIAL_SCAN_MAX = 20


class Block(nn.Module):
    def __init__(self, config: ModelConfig, with_mamba: bool):
        super().__init__()
        self.norm = make_norm(config)
        self.attn = XLAttention(config.d_model, config.n_heads)
        self.mlp = GatedMLP(config.d_model, config.d_ff, config.elephant_a, config.elephant_d)
        self.mamba_norm = make_norm(config) if with_mamba else None
        self.mamba = (
            Mamba(
                config.d_model,
                config.mamba_d_state,
                config.mamba_d_conv,
                config.mamba_expand,
                config.dt_rank,
                config.mamba_dt_min,
            )
            if with_mamba
            else None
        )

    def forward(
        self, x: torch.Tensor, *, state: LayerState, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, LayerState]:
        """Positions x [B, L, d] of a window after those `state` holds (model/window.py): the layer's
        output, and its state with these positions read. `mask` [B, 1, L, cached + L] says which
        keys each position sees (None: every key up to itself, XLAttention.attend); cos/sin are the
        rotary tables."""
        normed = self.norm(x)
        attended, attention = self.attn.attend(normed, state.attention, mask, cos, sin)
        x = x + attended + self.mlp(normed)
        conv_state, ssm_state = state.conv, state.ssm
        if self.mamba is not None:
            length = x.shape[1]
            if length == 1:  # one position (token-by-token decoding): the direct state update, no scan
                mixed, conv_state, ssm_state = self.mamba.step(self.mamba_norm(x), conv_state, ssm_state)
            else:
                # A few positions of a window read in pieces (decoding: a pause and its token, the
                # read memory, the write slots) scan token by token; whole windows use the fast scan.
                sequential = state.attention.capacity is not None and length <= SEQUENTIAL_SCAN_MAX
                mixed, conv_state, ssm_state = self.mamba(
                    self.mamba_norm(x), conv_state, ssm_state, sequential=sequential
                )
            x = x + mixed
        return x, LayerState(attention, conv_state, ssm_state)


class BakaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d_model = config.d_model
        self.embed = nn.Embedding(config.padded_vocab_size, d_model)
        n_pause_vectors = min(config.n_pauses, 1) if config.pause_embedding == "shared" else config.n_pauses
        self.pause = nn.Parameter(torch.zeros(n_pause_vectors, d_model))
        # The reference layout has no read slots in a fresh window, so it learns no initial memory.
        self.initial_memory = (
            nn.Parameter(torch.zeros(config.n_memory, d_model)) if config.memory_layout == "learned_slots" else None
        )
        self.write_slots = nn.Parameter(torch.zeros(config.n_memory, d_model))
        self.layers = nn.ModuleList(Block(config, config.has_mamba(index)) for index in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(d_model, config.padded_vocab_size, bias=False)
        self.document_cache = (
            DocumentCache(d_model, config.vocab_size, config.document_cache_order) if config.document_cache else None
        )
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
        files = model_files(path)
        model = cls(files.config)
        load_weights(model, files.weights, files.weight_prefix)
        return model.to(device)

    # ----- state -----
    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> RecurrentState:
        """A fresh state for every row: zero caches of full-window size and no past."""
        config = self.config
        device = device if device is not None else self.embed.weight.device
        cache_shape = (batch_size, config.n_heads, config.cache_length, config.head_dim)
        mamba_states = [
            layer.mamba.initial_state(batch_size, device) for layer in self.layers if layer.mamba is not None
        ]
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
        fresh = state is None
        if fresh:
            state = self.init_state(batch, input_ids.device)
        if reset is not None:
            state = state.reset(reset)
        window = self.config.window
        window_logits, window_hidden, window_mixtures = [], [], []
        reader = WindowReader(self, state, fresh=fresh)
        # Every token of the call embedded at once: the embedding's gradient, a tensor the size of the
        # vocabulary's table, is then built once per call rather than once per window.
        embedded = self.embed(input_ids)
        for start in range(0, length, window):
            window_ids = input_ids[:, start : start + window]
            before = reader.state
            hidden = reader.read(window_ids, ends_window=True, embedded=embedded[:, start : start + window])
            state = reader.commit()
            if targets is None and not return_logits:
                continue
            hidden = self.final_norm(hidden)
            if targets is not None:
                window_hidden.append(hidden)
                if self.document_cache is not None:
                    mixture = self.document_cache.target_mixture(
                        hidden, before, window_ids, targets[:, start : start + window]
                    )
                    window_mixtures.append(tuple(part.view(batch, -1) for part in mixture))
            if return_logits:
                logits = self.lm_head(hidden)[..., : self.config.vocab_size]
                if self.document_cache is not None:
                    logits = self.document_cache.window_log_probs(hidden, logits, before, window_ids)
                window_logits.append(logits)
        loss = n_targets = token_losses = None
        if targets is not None:
            # One loss over every window of the call: the head's weight gradient is built once per
            # call rather than once per window (each a float32 tensor the size of the head).
            mixture = (
                tuple(torch.cat(parts, dim=1).flatten() for parts in zip(*window_mixtures)) if window_mixtures else None
            )
            loss_sum, token_losses = self._cross_entropy(
                torch.cat(window_hidden, dim=1).flatten(0, 1), targets.flatten(), mixture
            )
            n_targets = (targets != IGNORE_INDEX).sum()
            loss = loss_sum / n_targets.clamp(min=1)
            token_losses = token_losses.view(targets.shape)
        all_logits = (
            (window_logits[0] if len(window_logits) == 1 else torch.cat(window_logits, dim=1))
            if return_logits
            else None
        )
        return ModelOutput(logits=all_logits, loss=loss, state=state, n_targets=n_targets, token_losses=token_losses)

    def _cross_entropy(
        self, hidden: torch.Tensor, targets: torch.Tensor, mixture: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of targets [N] from their final hidden states [N, d], and each target's
        loss [N], in chunks of tokens: the float32 logits never all exist at once."""
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

    # ----- the pieces of a window that the window runtime (model/window.py) asks for -----
    def embed_window_tokens(
        self, input_ids: torch.Tensor, first: int, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeds tokens `first`, `first`+1, ... of a window (or takes their embeddings `tokens`)
        and puts pause k before token k * pause_step (k < n_pauses).

        Returns the body [B, n, d] (these tokens and the pauses that fall among them, starting
        with the pause before token `first` if there is one) and each token's index in it.
        """
        config = self.config
        tokens = self.embed(input_ids) if tokens is None else tokens
        batch, length, d_model = tokens.shape
        indices = torch.arange(first, first + length, device=tokens.device)
        if config.n_pauses == 0:
            return tokens, indices - first
        step, n_pauses = config.pause_step, config.n_pauses
        last = first + length - 1
        first_pause = -(-first // step)
        if first_pause > min(last // step, n_pauses - 1):  # no pause among these tokens (most decoded tokens)
            return tokens, indices - first
        body_start = first + min(first_pause, n_pauses)  # the body index of the pause before `first`, or of `first`
        body_length = last + min(last // step + 1, n_pauses) + 1 - body_start
        token_positions = indices + torch.clamp(indices // step + 1, max=n_pauses) - body_start
        pause_numbers = torch.arange(first_pause, min(last // step, n_pauses - 1) + 1, device=tokens.device)
        pause_rows = pause_numbers if self.pause.shape[0] > 1 else torch.zeros_like(pause_numbers)  # one shared vector
        body = tokens.new_zeros(batch, body_length, d_model).index_copy(1, token_positions, tokens)
        pauses = self.pause.to(tokens.dtype).index_select(0, pause_rows).expand(batch, -1, -1)
        return body.index_copy(1, pause_numbers * (step + 1) - body_start, pauses), token_positions

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
            torch._assert_async(
                ((input_ids >= 0) & (input_ids < vocab)).all(), "input_ids outside the model's vocabulary"
            )
        if reset is not None and (
            not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or tuple(reset.shape) != (batch,)
        ):
            got = f"{tuple(reset.shape)} {reset.dtype}" if isinstance(reset, torch.Tensor) else type(reset).__name__
            raise ValueError(f"reset must be a bool tensor of shape [{batch}] (one flag per row), got {got}.")
        if state is not None and state.batch_size != batch:
            raise ValueError(
                f"state holds {state.batch_size} rows but input_ids has {batch}; pass a state from init_state({batch})."
            )
        if targets is not None and (
            not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(input_ids.shape)
        ):
            got = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, got {got}.")
