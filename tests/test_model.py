"""Recurrence properties of BakaLM: window invariance, row isolation, reset, causality, memory."""

import pytest
import torch

from bakallm import BakaLM, ModelConfig, RecurrentState

VOCAB = 300


def small_config(**changes) -> ModelConfig:
    # The tiny preset with a small vocabulary, small windows for speed, and celp18's features on.
    values = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, d_ff=128, window=32, n_memory=4, n_pauses=4)
    values.update(changes)
    return ModelConfig.preset("tiny", **values)


@pytest.fixture
def model() -> BakaLM:
    torch.manual_seed(0)
    return BakaLM(small_config()).eval()


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run_in_pieces(model, ids, cuts):
    state, pieces = None, []
    for start, end in zip([0, *cuts], [*cuts, ids.shape[1]]):
        out = model(ids[:, start:end], state=state)
        state = out.state
        pieces.append(out.logits)
    return torch.cat(pieces, dim=1), state


def test_output_shapes_and_loss_definition(model):
    ids = tokens(2, 70)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[1, :10] = -100
    out = model(ids, targets=targets)
    assert out.logits.shape == (2, 70, VOCAB) and out.logits.dtype == torch.float32
    mask = targets != -100
    expected = torch.nn.functional.cross_entropy(out.logits[mask], targets[mask])
    torch.testing.assert_close(out.loss, expected)
    assert int(out.n_targets) == int(mask.sum())
    assert model(ids).loss is None


def test_one_call_over_three_windows_equals_three_calls(model):
    ids = tokens(2, 96)
    whole = model(ids)
    pieces, state = run_in_pieces(model, ids, [32, 64])
    torch.testing.assert_close(pieces, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(state.memory, whole.state.memory, atol=1e-5, rtol=0)


def test_partial_windows_continue_from_the_carried_state(model):
    ids = tokens(1, 50)
    whole = model(ids).logits
    pieces, _ = run_in_pieces(model, ids, [32])
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)


def test_rows_are_isolated(model):
    ids = tokens(2, 80)
    other = ids.clone()
    other[1] = tokens(1, 80, seed=5)[0]
    first, second = model(ids).logits, model(other).logits
    assert torch.equal(first[0], second[0])
    assert not torch.allclose(first[1], second[1])


def test_reset_row_equals_the_document_run_alone(model):
    history, document = tokens(2, 64, seed=1), tokens(2, 64, seed=2)
    state = model(history).state
    out = model(document, state=state, reset=torch.tensor([False, True]))
    alone = model(document[1:]).logits
    torch.testing.assert_close(out.logits[1:], alone, atol=1e-5, rtol=0)
    continued = model(document[:1], state=state.select([0])).logits
    torch.testing.assert_close(out.logits[:1], continued, atol=1e-5, rtol=0)


@pytest.mark.parametrize("position", [0, 5, 31, 32, 40, 75])
def test_changing_a_token_changes_no_earlier_logit(model, position):
    ids = tokens(1, 96)
    changed = ids.clone()
    changed[0, position] = (ids[0, position] + 1) % VOCAB
    before, after = model(ids).logits, model(changed).logits
    assert torch.equal(before[:, :position], after[:, :position])
    assert not torch.allclose(before[:, position:], after[:, position:])


def test_state_flows_between_windows_and_reset_cuts_it(model):
    window_one, window_one_changed, window_two = tokens(1, 32, 1), tokens(1, 32, 2), tokens(1, 32, 3)
    state, state_changed = model(window_one).state, model(window_one_changed).state
    second = model(window_two, state=state).logits
    second_changed = model(window_two, state=state_changed).logits
    assert (second - second_changed).abs().max() > 1e-3
    reset = torch.tensor([True])
    torch.testing.assert_close(
        model(window_two, state=state, reset=reset).logits,
        model(window_two, state=state_changed, reset=reset).logits,
        atol=0,
        rtol=0,
    )


def test_memory_alone_carries_information():
    """With attention cache and Mamba state cut off, only the RMT memory links two windows."""
    torch.manual_seed(0)
    model = BakaLM(small_config(carry_mamba_state=False)).eval()
    first, changed, second = tokens(1, 32, 1), tokens(1, 32, 2), tokens(1, 32, 3)

    state_a, state_b = model(first).state, model(changed).state
    # Give both runs the same attention cache: the only remaining difference is the memory.
    state_b = RecurrentState(
        memory=state_b.memory,
        keys=state_a.keys,
        values=state_a.values,
        conv=state_a.conv,
        ssm=state_a.ssm,
        has_past=state_a.has_past,
    )
    assert not torch.equal(state_a.memory, state_b.memory)
    assert (model(second, state=state_a).logits - model(second, state=state_b).logits).abs().max() > 1e-4


def test_memory_is_the_last_layer_output_at_the_write_slots(model):
    captured = {}
    model.layers[-1].register_forward_hook(lambda module, args, output: captured.update(x=output[0]))
    out = model(tokens(2, 32))
    torch.testing.assert_close(out.state.memory, captured["x"][:, -model.config.n_memory :])


def test_mamba_state_is_carried_or_reset_per_preset_behaviour():
    torch.manual_seed(0)
    carried = BakaLM(small_config()).eval()
    torch.manual_seed(0)
    restarted = BakaLM(small_config(carry_mamba_state=False)).eval()
    ids = tokens(1, 64)
    # Same weights, same first window; only the second differs through the Mamba state.
    torch.testing.assert_close(carried(ids[:, :32]).logits, restarted(ids[:, :32]).logits)
    assert (carried(ids).logits[:, 32:] - restarted(ids).logits[:, 32:]).abs().max() > 1e-6
    state = carried(ids[:, :32]).state
    assert all(ssm.abs().sum() > 0 for ssm in state.ssm)


def test_backward_through_two_windows_reaches_every_parameter():
    torch.manual_seed(0)
    model = BakaLM(small_config())
    ids = tokens(2, 64)
    model(ids, targets=torch.roll(ids, -1, 1)).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_bad_inputs_raise_clear_value_errors(model):
    ids = tokens(2, 16)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="2-D tensor"):
        model(ids[0])
    with pytest.raises(ValueError, match="integer token ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="reset must be a bool tensor of shape \\[2\\]"):
        model(ids, reset=torch.tensor([True]))
    with pytest.raises(ValueError, match="reset must be a bool tensor"):
        model(ids, reset=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="state holds 3 rows"):
        model(ids, state=model.init_state(3))
    with pytest.raises(ValueError, match="targets must have the shape"):
        model(ids, targets=ids[:, :3])


def test_without_memory_mamba_and_xl_cache_each_window_is_independent():
    # A windowed GPT: the second window's logits are those of that window read alone.
    torch.manual_seed(0)
    windowed = BakaLM(small_config(n_memory=0, mamba=False, xl_cache=False)).eval()
    ids = tokens(2, 64)
    with torch.no_grad():
        whole = windowed(ids).logits
        alone = windowed(ids[:, 32:]).logits
    torch.testing.assert_close(whole[:, 32:], alone, rtol=0, atol=1e-5)
    assert windowed.init_state(2).keys[0].shape[2] == 0


def test_xl_cache_alone_carries_the_previous_window():
    # With memory and Mamba off, only the attention cache links two windows.
    torch.manual_seed(0)
    cached = BakaLM(small_config(n_memory=0, mamba=False)).eval()
    ids = tokens(2, 64)
    other = ids.clone()
    other[:, :32] = tokens(2, 32, seed=1)
    with torch.no_grad():
        first = cached(ids).logits[:, 32:]
        second = cached(other).logits[:, 32:]
    assert (first - second).abs().max() > 1e-3
