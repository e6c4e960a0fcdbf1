"""Multi-head attention over [previous window, current window] (Transformer-XL cache) with rotary
positions.

Keys and values of the previous window are cached unrotated; each call rotates the concatenated
keys from position 0 and offsets the queries by the past length, so relative distances are the
same whether or not a past exists. Rows without a past (fresh documents) are masked from the whole
past block, so they never see a stale key.
"""

from __future__ import annotations

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
        """x [B, L, d]; past_* [B, H, Lp, Dh] unrotated; mask from `xl_attention_mask`;
        cos/sin tables covering positions 0..Lp+L-1. Returns (output, key, value) with this
        window's unrotated key and value for the next window's cache."""
        batch, length, d_model = x.shape
        query, key, value = self.qkv(x).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past_length = past_key.shape[2]
        keys = torch.cat((past_key.to(key.dtype), key), dim=2)
        values = torch.cat((past_value.to(value.dtype), value), dim=2)
        keys = apply_rotary(keys, cos[: past_length + length], sin[: past_length + length])
        rotated_query = apply_rotary(query, cos[past_length : past_length + length], sin[past_length : past_length + length])
        attended = F.scaled_dot_product_attention(rotated_query, keys, values, attn_mask=mask)
        output = self.out(attended.transpose(1, 2).reshape(batch, length, d_model))
        return output, key, value
