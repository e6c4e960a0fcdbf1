"""Multi-head attention over [previous window, current window] (Transformer-XL cache) with rotary
positions.

Keys and values of the previous window are cached unrotated (that is what the recurrent state
holds); when a window begins they are rotated once from position 0, and each position of the window
is rotated at its place after them, queries and keys alike, so relative distances are the same
whether or not a past exists. Rows without a past (fresh documents) are masked from the whole past
block, so they never see a stale key; a window whose rows are all known to have none reads no past
block at all and attends causally (model/window.py, `fresh`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from bakallm.model.rotary import apply_rotary


def xl_attention_mask(past_valid: torch.Tensor, past_length: int, length: int, window_prefix: int = 0) -> torch.Tensor:
    """Boolean mask [B, 1, length, past_length + window_prefix + length]: True where a query may attend.

    The keys are [previous window (past_length) | earlier positions of this window (window_prefix) |
    these `length` positions]. Queries see the whole past block when their row has a past, every
    earlier position of their window, and causally among themselves.
    """
    device = past_valid.device
    batch = past_valid.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    past = past_valid.view(-1, 1, 1, 1).expand(-1, 1, length, past_length)
    prefix = torch.ones(batch, 1, length, window_prefix, dtype=torch.bool, device=device)
    return torch.cat((past, prefix, causal.expand(batch, 1, length, length)), dim=-1)


class KeyValueCache(NamedTuple):
    """One layer's attention keys and values through a window in progress.

    It starts from the previous window's keys (unrotated, as the recurrent state holds them) and
    values. When the window's first positions arrive, the past keys are rotated once from position 0;
    every position of the window then adds its rotated key and its value after them (what attention
    reads) and its unrotated key (what the window hands on to the next one). `add` returns a new
    cache, so a block can run twice on the same input (activation checkpointing recomputes it).

    Two ways to hold them, with the same values:
    - `capacity` None: grown by concatenation. A forward call reads a whole window in one piece this
      way; nothing is written in place, as autograd, activation checkpointing and torch.compile want.
    - `capacity` positions: buffers of the window's full length, allocated when its first piece
      arrives, that every piece writes into (the caches `add` returns share them). Decoding reads a
      window in pieces of one token, so a token costs no copy of the cache and no rotation of the
      keys before it.
    """

    past_key: torch.Tensor  # [B, H, Lp, Dh], unrotated
    past_value: torch.Tensor  # [B, H, Lp, Dh]
    capacity: int | None = None
    length: int = 0  # positions of this window added so far
    keys: torch.Tensor | None = None  # rotated, [past | window] (with a capacity: the whole buffer)
    values: torch.Tensor | None = None  # [past | window]
    window_keys: torch.Tensor | None = None  # this window's, unrotated

    @property
    def position(self) -> int:
        """The rotary position of the next position added: the past block comes first."""
        return self.past_key.shape[2] + self.length

    def add(
        self, key: torch.Tensor, rotated_key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, KeyValueCache]:
        """Adds positions (key unrotated, rotated at `position`, and value, [B, H, L, Dh]); returns the
        rotated keys and the values of the past and of the window so far, these positions included,
        and the cache that holds them. cos/sin: the whole rotary tables."""
        length, past = key.shape[2], self.past_key.shape[2]
        keys, values, window_keys = self.keys, self.values, self.window_keys
        if keys is None:
            past_key = self.past_key if self.past_key.dtype == key.dtype else self.past_key.to(key.dtype)
            past_value = self.past_value if self.past_value.dtype == value.dtype else self.past_value.to(value.dtype)
            rotated_past = apply_rotary(past_key, cos[:past], sin[:past])
            if self.capacity is None:
                keys, values = torch.cat((rotated_past, rotated_key), 2), torch.cat((past_value, value), 2)
                return keys, values, self._replace(length=length, keys=keys, values=values, window_keys=key)
            batch, heads, _, head_dim = key.shape
            keys = key.new_empty(batch, heads, past + self.capacity, head_dim)
            values = value.new_empty(batch, heads, past + self.capacity, head_dim)
            window_keys = key.new_empty(batch, heads, self.capacity, head_dim)
            keys[:, :, :past] = rotated_past
            values[:, :, :past] = past_value
        total = self.length + length
        if self.capacity is None:
            keys, values = torch.cat((keys, rotated_key), 2), torch.cat((values, value), 2)
            return (
                keys,
                values,
                self._replace(length=total, keys=keys, values=values, window_keys=torch.cat((window_keys, key), 2)),
            )
        if total > self.capacity:
            raise ValueError(
                f"A window holds {self.capacity} positions; {self.length} are read and {length} more do not fit."
            )
        start = past + self.length
        keys[:, :, start : past + total] = rotated_key
        values[:, :, start : past + total] = value
        window_keys[:, :, self.length : total] = key
        cache = KeyValueCache(self.past_key, self.past_value, self.capacity, total, keys, values, window_keys)
        return keys[:, :, : past + total], values[:, :, : past + total], cache

    def window_key_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This window's keys (unrotated) and values so far, [B, H, length, Dh]."""
        if self.keys is None:
            empty = self.past_value[:, :, :0]
            return empty, empty
        past = self.past_key.shape[2]
        return self.window_keys[:, :, : self.length], self.values[:, :, past : past + self.length]


class XLAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One whole window at once: x [B, L, d]; past_* [B, H, Lp, Dh] unrotated; mask from
        `xl_attention_mask`; cos/sin tables covering positions 0..Lp+L-1. Returns (output, key,
        value) with this window's unrotated key and value for the next window's cache."""
        output, cache = self.attend(x, KeyValueCache(past_key, past_value), mask, cos, sin)
        return (output, *cache.window_key_values())

    def attend(
        self, x: torch.Tensor, cache: KeyValueCache, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, KeyValueCache]:
        """Positions x [B, L, d] after those `cache` holds, which they attend to where `mask`
        [B, 1, L, cached + L] allows (None: each sees every key up to itself, that is all of them
        for one position, and causally when the cache holds nothing before these positions);
        returns their output and the cache with their keys and values added. cos/sin: tables
        covering the positions up to these."""
        batch, length, d_model = x.shape
        # Linear layers on rows [B * L, d]: on a 3-D input they reshape to 2-D and back, three more
        # operator calls each, which token-by-token decoding notices. The same products.
        qkv = (
            self.qkv(x.reshape(batch * length, d_model))
            .view(batch, length, 3, self.n_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        # unbind, not indexing: its backward stacks the three gradients in one pass, where each index's
        # backward would fill a zero tensor the size of all three.
        query, key, value = qkv.unbind(0)
        start = cache.position
        window_cos, window_sin = cos[start : start + length], sin[start : start + length]
        query, rotated_key = apply_rotary(query, window_cos, window_sin), apply_rotary(key, window_cos, window_sin)
        keys, values, cache = cache.add(key, rotated_key, value, cos, sin)
        causal = mask is None and length > 1
        if causal and keys.shape[2] != length:
            raise ValueError(f"Without a mask, {length} positions after {keys.shape[2] - length} cached ones need one.")
        attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=causal)
        return self.out(attended.transpose(1, 2).reshape(batch * length, d_model)).view(batch, length, d_model), cache
