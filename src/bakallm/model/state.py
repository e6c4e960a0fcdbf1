"""Recurrent state of each batch row: what one window hands to the next.

Every tensor has the batch as its first dimension, so rows can be reset, selected and reordered
independently. `has_past[b]` is False for a row that starts a fresh document: the model then
reads the learned initial memory, masks the attention cache, and starts Mamba from zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

# The fields of the document cache (ModelConfig.document_cache): exact counts of what the document
# held, as opposed to the network's own state.
DOCUMENT_CACHE_FIELDS = ("token_counts", "ngram_keys", "ngram_counts", "recent_tokens")
# A field holding a tuple of tensors (one per layer, or per n-gram order) is marked so; every other
# field is one tensor or None. Mapping, resetting, saving and loading read the fields from here,
# so a new field is declared once.
PER_LAYER = {"per_layer": True}


@dataclass(frozen=True)
class RecurrentState:
    memory: torch.Tensor  # [B, n_memory, d_model]: last layer's output at the write slots
    keys: tuple[torch.Tensor, ...] = field(metadata=PER_LAYER)  # per layer [B, n_heads, L_past, head_dim], unrotated
    values: tuple[torch.Tensor, ...] = field(metadata=PER_LAYER)  # per layer, like keys
    conv: tuple[torch.Tensor, ...] = field(metadata=PER_LAYER)  # per layer [B, d_inner, d_conv - 1]
    ssm: tuple[torch.Tensor, ...] = field(metadata=PER_LAYER)  # per layer [B, d_inner, d_state]
    has_past: torch.Tensor  # [B] bool
    # [B, vocab_size] float32: how often each token occurred so far in the row's document; None
    # for a model without the document cache (ModelConfig.document_cache).
    token_counts: torch.Tensor | None = None
    # With ModelConfig.document_cache_order k > 1, for each context length c = 1 .. k-1: the
    # document's runs of c tokens with the token that followed, as n-gram keys sorted along each
    # row [B, P_c] int64 and their counts [B, P_c] float32 (entries of count 0 are padding, so a
    # zeroed row is an empty one); and the last k - 1 tokens read [B, k - 1], right-aligned.
    ngram_keys: tuple[torch.Tensor, ...] = field(default=(), metadata=PER_LAYER)
    ngram_counts: tuple[torch.Tensor, ...] = field(default=(), metadata=PER_LAYER)
    recent_tokens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.has_past.shape[0]

    def _map(self, function) -> "RecurrentState":
        """Applies `function` to every tensor (all are batch-first)."""
        mapped = {}
        for entry in fields(self):
            value = getattr(self, entry.name)
            if entry.metadata.get("per_layer"):
                mapped[entry.name] = tuple(function(tensor) for tensor in value)
            else:
                mapped[entry.name] = None if value is None else function(value)
        return RecurrentState(**mapped)

    def reset(self, rows: torch.Tensor, keep_document_cache: bool = False) -> "RecurrentState":
        """A state where the rows flagged in the bool tensor `rows` [B] are fresh (zeroed, no past);
        with `keep_document_cache`, only the network's state is cleared and the document cache's
        counts stay (to show what the network itself carries)."""
        if rows.dtype != torch.bool or rows.shape != (self.batch_size,):
            raise ValueError(
                f"reset must be a bool tensor of shape [{self.batch_size}], got {tuple(rows.shape)} {rows.dtype}."
            )
        keep = ~rows.to(self.has_past.device)

        def clear(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dtype == torch.bool:
                return tensor & keep
            # where, not multiplication: a stale NaN must not survive the reset.
            return torch.where(
                keep.view(-1, *([1] * (tensor.dim() - 1))),
                tensor,
                torch.zeros((), dtype=tensor.dtype, device=tensor.device),
            )

        cleared = self._map(clear)
        return (
            replace(cleared, **{name: getattr(self, name) for name in DOCUMENT_CACHE_FIELDS})
            if keep_document_cache
            else cleared
        )

    def part_sizes(self) -> dict[str, torch.Tensor]:
        """The root-mean-square value of each part of the network's state, per row [B] (float32):
        memory, keys, values, conv and ssm, each over all its layers. What a long document must keep
        bounded (the document cache's counts grow with the document by design and are left out)."""
        sizes = {}
        for name in ("memory", "keys", "values", "conv", "ssm"):
            parts = getattr(self, name)
            parts = parts if isinstance(parts, tuple) else (parts,)
            if parts:
                squares = sum(part.float().square().flatten(1).sum(1) for part in parts)
                sizes[name] = (squares / sum(part[0].numel() for part in parts)).sqrt()
        return sizes

    def detach(self) -> "RecurrentState":
        """The same values cut from the autograd graph (truncated backpropagation through time)."""
        return self._map(torch.Tensor.detach)

    def select(self, index: torch.Tensor | list[int]) -> "RecurrentState":
        """Rows picked or reordered by `index` (a list or a long tensor of row numbers)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.has_past.device)
        return self._map(lambda tensor: tensor.index_select(0, index))

    def to(self, device: torch.device | str) -> "RecurrentState":
        return self._map(lambda tensor: tensor.to(device))

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping, e.g. for safetensors checkpoints ("keys.0", "keys.1", ... for per-layer fields)."""
        flat = {}
        for entry in fields(self):
            value = getattr(self, entry.name)
            if entry.metadata.get("per_layer"):
                flat.update({f"{entry.name}.{layer}": tensor for layer, tensor in enumerate(value)})
            elif value is not None:
                flat[entry.name] = value
        return flat

    @classmethod
    def from_dict(cls, flat: dict[str, torch.Tensor]) -> "RecurrentState":
        if "memory" not in flat or "has_past" not in flat:
            raise ValueError(
                "A recurrent state dict needs 'memory' and 'has_past' entries; it may come from another program."
            )
        values = {}
        for entry in fields(cls):
            if entry.metadata.get("per_layer"):
                count = sum(1 for key in flat if key.startswith(f"{entry.name}."))
                values[entry.name] = tuple(flat[f"{entry.name}.{index}"] for index in range(count))
            else:
                values[entry.name] = flat.get(entry.name)
        return cls(**{**values, "has_past": flat["has_past"].bool()})
