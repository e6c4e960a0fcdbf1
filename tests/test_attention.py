"""Transformer-XL attention against references written out here, not against another path of the same code.

Window invariance, row isolation and reset tests compare two runs of the same attention, so a cache
that is never read, a past block that is never masked, or queries rotated from the wrong position
pass them. These tests pin the attention itself.
"""

import math

import pytest
import torch

from bakallm import BakaLM, ModelConfig, RecurrentState
from bakallm.model.attention import XLAttention, xl_attention_mask
from bakallm.model.rotary import apply_rotary, rotary_tables

VOCAB = 300
BASE = 10000.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rotate(vector: torch.Tensor, position: int) -> torch.Tensor:
    """Rotary embedding of one head vector at an absolute position: pair (i, i + half) turns by position / BASE^(2i/dim)."""
    half = vector.shape[-1] // 2
    angles = position / BASE ** (torch.arange(half, dtype=torch.float64) * 2 / vector.shape[-1])
    first, second = vector[..., :half], vector[..., half:]
    return torch.cat(
        (first * angles.cos() - second * angles.sin(), second * angles.cos() + first * angles.sin()), dim=-1
    )


def naive_xl_attention(attention: XLAttention, x, past_key, past_value, has_past):
    """Softmax attention of each query over [past block, earlier window tokens], one row, head and pair at a time.

    Past key j sits at absolute position j, window token i at past_length + i.
    """
    batch, length, d_model = x.shape
    heads, head_dim = attention.n_heads, attention.head_dim
    past_length = past_key.shape[2]
    weight = attention.qkv.weight.double()
    query, key, value = (x.double() @ weight.t()).view(batch, length, 3, heads, head_dim).unbind(2)
    output = torch.zeros(batch, length, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            keys = (
                [(j, past_key[b, h, j].double(), past_value[b, h, j].double()) for j in range(past_length)]
                if has_past[b]
                else []
            )
            for i in range(length):
                visible = keys + [(past_length + j, key[b, j, h], value[b, j, h]) for j in range(i + 1)]
                q = rotate(query[b, i, h], past_length + i)
                scores = torch.stack([rotate(k, position) @ q / math.sqrt(head_dim) for position, k, _ in visible])
                weights = torch.softmax(scores, dim=0)
                output[b, i, h] = sum(w * v for w, (_, _, v) in zip(weights, visible))
    return output.reshape(batch, length, d_model) @ attention.out.weight.double().t()


def test_rotation_and_its_gradient_equal_the_half_split_formula(cpu_kernels):
    """Against x * cos + [-x2, x1] * sin through autograd, with tables whose halves differ, so that a
    backward rotating the wrong way or by the wrong half's angles fails; x is a permuted view, as
    the attention's query and key are."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2, 7, 3, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    x = base.permute(0, 2, 1, 3)
    cos, sin = (torch.randn(7, 8, dtype=torch.float64, generator=generator) for _ in range(2))
    grad = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=generator)
    got = apply_rotary(x, cos, sin)
    want = x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, base, grad)[0], torch.autograd.grad(want, base, grad)[0])
    with torch.no_grad():
        torch.testing.assert_close(apply_rotary(x, cos, sin), want)
    # Under bfloat16 autocast the rotation runs in the tables' float32 and returns x's dtype.
    low = x.detach().to(torch.bfloat16).requires_grad_()
    rotated = apply_rotary(low, cos.float(), sin.float())
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.double(), want.detach(), atol=0.05, rtol=0.02)
    assert cpu_kernels.calls == 4  # forward, backward, without gradients, bfloat16 (not taken)


@pytest.mark.parametrize("past_length", [0, 5])
def test_xl_attention_equals_naive_softmax_attention_at_absolute_positions(past_length):
    torch.manual_seed(0)
    attention = XLAttention(d_model=16, n_heads=2)
    batch, length, head_dim = 2, 4, 8
    x = torch.randn(batch, length, 16)
    past_key, past_value = torch.randn(batch, 2, past_length, head_dim), torch.randn(batch, 2, past_length, head_dim)
    has_past = torch.tensor([True, False])  # the second row is a fresh document: its random past must be invisible
    cos, sin = rotary_tables(past_length + length, head_dim, BASE, torch.device("cpu"))
    with torch.no_grad():
        output, key, value = attention(
            x, past_key, past_value, xl_attention_mask(has_past, past_length, length), cos, sin
        )
    expected = naive_xl_attention(attention, x, past_key, past_value, has_past)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-6)
    # The cache handed on is this window's keys and values, unrotated.
    _, raw_key, raw_value = (x @ attention.qkv.weight.t()).view(batch, length, 3, 2, head_dim).unbind(2)
    torch.testing.assert_close(key, raw_key.transpose(1, 2))
    torch.testing.assert_close(value, raw_value.transpose(1, 2))


def small_model(**changes) -> BakaLM:
    values = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128, window=32, n_memory=4, n_pauses=4)
    torch.manual_seed(0)
    return BakaLM(ModelConfig.preset("tiny", **{**values, **changes})).eval()


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_cache_of(state: RecurrentState, other: RecurrentState) -> RecurrentState:
    """`state` with the attention keys and values of `other`: memory and Mamba state stay those of `state`."""
    return RecurrentState(
        memory=state.memory,
        keys=other.keys,
        values=other.values,
        conv=state.conv,
        ssm=state.ssm,
        has_past=state.has_past,
    )


def test_the_previous_window_reaches_the_next_through_attention_alone():
    model = small_model()
    state = model(tokens(2, 32, seed=1)).state
    other_window = model(tokens(2, 32, seed=2)).state
    swapped = with_cache_of(state, other_window)
    assert not torch.equal(swapped.keys[0], state.keys[0])
    current = tokens(2, 32, seed=3)
    with torch.no_grad():
        difference = (model(current, state=state).logits - model(current, state=swapped).logits).abs().max()
    assert difference > 1e-3


def test_a_fresh_row_ignores_whatever_its_cache_holds():
    model = small_model()
    fresh = model.init_state(2)
    generator = torch.Generator().manual_seed(4)
    stale = RecurrentState(
        memory=fresh.memory,
        keys=tuple(torch.randn(k.shape, generator=generator) * 3 for k in fresh.keys),
        values=tuple(torch.randn(v.shape, generator=generator) * 3 for v in fresh.values),
        conv=fresh.conv,
        ssm=fresh.ssm,
        has_past=fresh.has_past,
    )
    ids = tokens(2, 48, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids, state=stale).logits, model(ids, state=fresh).logits)


def test_carried_queries_sit_after_the_past_block():
    """With memory and Mamba off, a window after a past equals a naive attention model over both windows' keys."""
    model = small_model(n_memory=0, n_pauses=0, mamba=False, n_layers=1)
    first, second = tokens(1, 32, seed=6), tokens(1, 32, seed=7)
    with torch.no_grad():
        state = model(first).state
        logits = model(second, state=state).logits
        layer = model.layers[0]
        x = model.embed(second)
        normed = layer.norm(x)
        attended = naive_xl_attention(layer.attn, normed, state.keys[0], state.values[0], torch.tensor([True])).float()
        expected = model.lm_head(model.final_norm(x + attended + layer.mlp(normed)))[..., :VOCAB]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
