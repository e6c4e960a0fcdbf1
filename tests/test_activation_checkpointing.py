"""Activation checkpointing (--activation-checkpointing): the same gradients, with each block's
forward run again in the backward pass instead of keeping its activations."""

import copy

import torch

from bakallm import BakaLM, ModelConfig
from bakallm.acceleration import checkpoint_layers


def _model() -> BakaLM:
    torch.manual_seed(0)
    config = ModelConfig.preset(
        "tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, window=16, n_memory=2, n_pauses=2
    )
    return BakaLM(config)


def test_checkpointed_blocks_run_again_in_backward_and_give_the_same_gradients():
    reference = _model()
    model = copy.deepcopy(reference)
    checkpoint_layers(model.layers)
    calls = []
    model.layers[0].mlp.register_forward_hook(lambda *args: calls.append(torch.is_grad_enabled()))
    ids = torch.randint(0, 64, (2, 40))
    state = reference.init_state(2)
    for each in (reference, model):
        each(ids, state=state, targets=ids.roll(-1, dims=1)).loss.backward()
    windows = 3  # 40 tokens in windows of 16
    assert len(calls) == 2 * windows  # once forward, once more in backward
    for (name, expected), actual in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-7, msg=name)
    # The saved weights are the model's own: nothing is renamed.
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_checkpointed_blocks_read_and_decode_as_before():
    reference = _model().eval()
    model = copy.deepcopy(reference).eval()
    checkpoint_layers(model.layers)
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
