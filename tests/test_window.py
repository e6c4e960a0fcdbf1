"""The window runtime (bakallm.model.window.WindowReader): one path for forward calls and decoding."""

import ast
from pathlib import Path

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.model.attention import KeyValueCache
from bakallm.model.network import RMSNorm
from bakallm.model.rotary import rotary_tables
from bakallm.model.window import LayerState, WindowReader

VOCAB = 256
WINDOW = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_of(**changes) -> BakaLM:
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, window=WINDOW, n_memory=4, n_pauses=4)
    torch.manual_seed(0)
    model = BakaLM(ModelConfig.preset("tiny", **{**values, **changes})).eval()
    with torch.no_grad():  # slots, pauses and the cache's gate larger than their init, so that a slip shows
        model.write_slots.normal_(0, 1)
        model.pause.normal_(0, 1)
        if model.document_cache is not None:
            for name, parameter in model.document_cache.named_parameters():
                parameter.normal_(0, 1) if "weight" in name else parameter.zero_()
    return model


@pytest.mark.parametrize(
    "changes",
    [{}, {"document_cache": True, "document_cache_order": 3}],
    ids=["pauses+memory+xl", "and the document cache"],
)
def test_reading_token_by_token_gives_the_forward_logits_and_states(changes):
    """Pauses (every 4 tokens), 4 memory slots, the XL cache, carried Mamba state, and optionally the
    document cache: the runtime read one token at a time across three window ends gives the logits
    of one forward call over the same tokens, and at each window end the forward's state."""
    model = model_of(**changes)
    total = 3 * WINDOW + 5
    ids = torch.randint(0, VOCAB, (2, total), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        forward = model(ids)
        reader = WindowReader(model, model.init_state(2))
        for position in range(total):
            hidden = reader.read(ids[:, position : position + 1])
            assert hidden.shape == (2, 1, model.config.d_model)
            logits = model.logits(hidden[:, -1], reader.state)
            torch.testing.assert_close(
                logits, forward.logits[:, position], rtol=0, atol=1e-4, msg=lambda m: f"token {position}: {m}"
            )
            if reader.window_full:
                state = reader.commit()
                want = model(ids[:, : position + 1]).state
                for name in (
                    "memory",
                    "keys",
                    "values",
                    "conv",
                    "ssm",
                    "token_counts",
                    "ngram_keys",
                    "ngram_counts",
                    "recent_tokens",
                ):
                    got, expected = getattr(state, name), getattr(want, name)
                    for g, w in zip(
                        got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,),
                        strict=True,
                    ):
                        if w is not None:
                            torch.testing.assert_close(
                                g,
                                w,
                                rtol=0,
                                atol=1e-4,
                                msg=lambda m, name=name: f"{name} after {position + 1} tokens: {m}",
                            )


@pytest.mark.parametrize("memory_layout", ["learned_slots", "copy_memory"])
def test_a_fresh_state_s_first_window_attends_causally_to_itself_with_the_masked_read_s_results(
    memory_layout, monkeypatch
):
    model = model_of(
        memory_layout=memory_layout, **({"memory_readout": "first_slots"} if memory_layout == "copy_memory" else {})
    )
    ids = torch.randint(0, VOCAB, (2, 2 * WINDOW + 5), generator=torch.Generator().manual_seed(3))
    calls = []
    real_attention = torch.nn.functional.scaled_dot_product_attention

    def recording_attention(query, key, value, attn_mask=None, is_causal=False):
        calls.append((is_causal, attn_mask is None, query.shape[2], key.shape[2]))
        return real_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_attention)
    with torch.no_grad():
        fresh = model(ids)  # no state given: the model knows no row has a past
        fresh_calls, calls[:] = list(calls), []
        masked = model(ids, state=model.init_state(2))  # the same zero state, read with its past block masked
    layout = model.config.layout_length
    first = layout - (model.config.n_memory if memory_layout == "copy_memory" else 0)  # no read slots there when fresh
    n_layers = model.config.n_layers
    assert fresh_calls[:n_layers] == [(True, True, first, first)] * n_layers
    assert all(not causal and not unmasked for causal, unmasked, _, _ in fresh_calls[n_layers:] + calls)
    assert calls[0][3] == model.config.cache_length + first  # the masked read attends over the past block too
    torch.testing.assert_close(fresh.logits, masked.logits, rtol=0, atol=2e-5)
    for name in ("memory", "keys", "values", "conv", "ssm"):
        for got, want in zip(getattr(fresh.state, name), getattr(masked.state, name), strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_whole_window_read_in_one_piece_commits_the_forward_state_exactly():
    model = model_of()
    ids = torch.randint(0, VOCAB, (2, 2 * WINDOW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reader = WindowReader(model, model.init_state(2), fresh=True)  # as a forward call without a state
        for start in (0, WINDOW):
            reader.read(ids[:, start : start + WINDOW], ends_window=True)
            reader.commit()
        want = model(ids).state
    for name in ("memory", "keys", "values", "conv", "ssm", "has_past"):
        got, expected = getattr(reader.state, name), getattr(want, name)
        assert all(
            torch.equal(g, w)
            for g, w in zip(
                got if isinstance(got, tuple) else (got,),
                expected if isinstance(expected, tuple) else (expected,),
                strict=True,
            )
        ), name


def test_the_runtime_refuses_what_does_not_fit_its_window():
    model = model_of()
    reader = WindowReader(model, model.init_state(1))
    with pytest.raises(ValueError, match="do not fit"):
        reader.read(torch.zeros(1, WINDOW + 1, dtype=torch.long))
    with torch.no_grad():
        reader.read(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ends_window"):
        reader.read(torch.zeros(1, 3, dtype=torch.long), ends_window=True)
    with pytest.raises(ValueError, match="commit"):
        WindowReader(model, model.init_state(1)).commit()


def test_a_cache_in_buffers_holds_what_concatenation_holds():
    torch.manual_seed(0)
    batch, heads, past, head_dim, pieces = 2, 3, 5, 8, (4, 1, 1, 3)
    cos, sin = rotary_tables(past + sum(pieces), head_dim, 10000.0, torch.device("cpu"))
    past_key, past_value = torch.randn(batch, heads, past, head_dim), torch.randn(batch, heads, past, head_dim)
    grown, buffered = KeyValueCache(past_key, past_value), KeyValueCache(past_key, past_value, capacity=sum(pieces))
    for length in pieces:
        key, rotated, value = (torch.randn(batch, heads, length, head_dim) for _ in range(3))
        keys_a, values_a, grown = grown.add(key, rotated, value, cos, sin)
        keys_b, values_b, buffered = buffered.add(key, rotated, value, cos, sin)
        assert torch.equal(keys_a, keys_b) and torch.equal(values_a, values_b)
        assert grown.position == buffered.position
    assert all(torch.equal(a, b) for a, b in zip(grown.window_key_values(), buffered.window_key_values()))
    with pytest.raises(ValueError, match="do not fit"):
        buffered.add(key, rotated, value, cos, sin)


def test_the_layer_state_is_named():
    model = model_of()
    reader = WindowReader(model, model.init_state(1))
    with torch.no_grad():
        reader.read(torch.zeros(1, 2, dtype=torch.long))
    layer = reader._layers[0]
    assert isinstance(layer, LayerState) and layer._fields == ("attention", "conv", "ssm")
    assert layer.attention.length == model.config.n_memory + 2 + 1  # read memory, two tokens, the pause before token 0


def test_the_rms_norm_is_nn_rms_norm_bitwise_or_within_rounding_through_the_compiled_kernels(cpu_kernels):
    """Without the compiled kernels; with them, forward with and without gradients give the same
    bits, and values and gradients equal nn.RMSNorm's within rounding (three rows up to 130, across
    the kernel's parts of 64 rows for the weight's gradient)."""
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    for shape in ((1, 1, 48), (2, 65, 48), (130, 48)):
        x = torch.randn(shape) * 3
        with torch.no_grad():
            want = torch.nn.functional.rms_norm(x, (48,), norm.weight, 1e-5)
            got = norm(x)
        if not cpu_kernels.compiled:
            assert torch.equal(got, want)
            continue
        torch.testing.assert_close(got, want)
        x.requires_grad_()
        traced = norm(x)
        assert torch.equal(traced.detach(), got)
        grad = torch.randn(shape)
        got_grads = torch.autograd.grad(traced, (x, norm.weight), grad)
        want_grads = torch.autograd.grad(
            torch.nn.functional.rms_norm(x, (48,), norm.weight, 1e-5), (x, norm.weight), grad
        )
        for name, g, w in zip(("x", "weight"), got_grads, want_grads):
            torch.testing.assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")
    assert cpu_kernels.calls == (6 if cpu_kernels.compiled else 3)


def test_the_network_does_not_import_model_io():
    """io loads models and imports the network; the network must not import io back, not even inside a function."""
    source = (Path(__file__).resolve().parents[1] / "src" / "bakallm" / "model" / "network.py").read_text(
        encoding="utf-8"
    )
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "bakallm.model.io" not in imported


def test_mamba_scans_a_few_positions_token_by_token_to_the_fast_scans_result():
    from bakallm.model.mamba import Mamba

    torch.manual_seed(0)
    mamba = Mamba(32, d_state=8).eval()
    x = torch.randn(2, 7, 32)
    conv, ssm = torch.randn(2, 64, 3), torch.randn(2, 64, 8)
    with torch.no_grad():
        fast = mamba(x, conv, ssm)
        sequential = mamba(x, conv, ssm, sequential=True)
    for got, want in zip(sequential, fast, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
