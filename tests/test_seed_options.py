"""The ModelConfig fields that reproduce the reference ("seed") system each change the forward as intended."""

import pytest
import torch
from torch import nn

from bakallm import BakaLM, ModelConfig
from bakallm.model.config import VOCAB_PAD_MULTIPLE

VOCAB = 300


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    yield


def config(**changes) -> ModelConfig:
    values = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, window=16, n_memory=2, n_pauses=4)
    values.update(changes)
    return ModelConfig.preset("tiny", **values)


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_seed_preset_has_the_reference_parameter_count():
    # The reference code (baka3.py) counts 182,929,152 trainable parameters with the GPT-NeoX
    # vocabulary of 50,277 ids. We pad the vocabulary to a multiple of 64 (50,304 rows), which adds
    # 27 rows to the input embedding and 27 to the output projection; nothing else may differ.
    seed = ModelConfig.preset("celp18-seed")
    with torch.device("meta"):
        model = BakaLM(seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    padding_rows = seed.padded_vocab_size - seed.vocab_size
    assert seed.padded_vocab_size % VOCAB_PAD_MULTIPLE == 0 and padding_rows == 27
    assert trainable - 2 * padding_rows * seed.d_model == 182_929_152


def test_layernorm_has_a_bias_everywhere():
    model = BakaLM(config(norm="layernorm"))
    norms = [module for module in model.modules() if isinstance(module, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * 2 + 1 and all(isinstance(norm, nn.LayerNorm) and norm.bias is not None for norm in norms)
    assert all(
        isinstance(m, nn.RMSNorm) for m in BakaLM(config()).modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
    )


def test_shared_pause_is_one_vector_used_at_every_pause():
    model = BakaLM(config(pause_embedding="shared")).eval()
    assert model.pause.shape == (1, 32)
    body, token_positions = model.embed_window_tokens(tokens(1, 16), first=0)
    pause_slots = sorted(set(range(body.shape[1])) - set(token_positions.tolist()))
    assert pause_slots == [0, 5, 10, 15]
    for slot in pause_slots:
        torch.testing.assert_close(body[0, slot], model.pause[0])


def test_window_slot_placement_puts_pauses_at_slots_0_s_2s():
    # window 16, 4 pauses, s = 4: the reference puts pauses at body slots 0, 4, 8, 12, so before
    # tokens 0, 3, 6, 9, and the last group holds the 7 remaining tokens.
    model = BakaLM(config(pause_placement="window_slots")).eval()
    ids = tokens(1, 16)
    body, token_positions = model.embed_window_tokens(ids, first=0)
    assert body.shape[1] == 20
    assert sorted(set(range(20)) - set(token_positions.tolist())) == [0, 4, 8, 12]
    torch.testing.assert_close(body[0, token_positions], model.embed(ids)[0])
    for k, slot in enumerate([0, 4, 8, 12]):
        torch.testing.assert_close(body[0, slot], model.pause[k])
    # Ours: pause k before token 4k, at slots 0, 5, 10, 15.
    ours = BakaLM(config()).eval()
    _, ours_positions = ours.embed_window_tokens(ids, first=0)
    assert sorted(set(range(20)) - set(ours_positions.tolist())) == [0, 5, 10, 15]


def test_partial_window_keeps_the_pauses_before_its_last_token():
    model = BakaLM(config(pause_placement="window_slots")).eval()
    body, positions = model.embed_window_tokens(tokens(1, 7), first=0)  # step 3: pauses before tokens 0, 3, 6
    assert body.shape[1] == 10 and positions.tolist() == [1, 2, 3, 5, 6, 7, 9]


def capture_layer_inputs(model):
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen


def test_copy_memory_layout_has_no_read_slots_in_window_one_and_copies_the_memory_later():
    model = BakaLM(config(memory_layout="copy_memory", n_pauses=0)).eval()
    assert model.initial_memory is None
    seen = capture_layer_inputs(model)
    ids = tokens(2, 32)
    out = model(ids)
    first, second = seen
    assert first.shape[1] == 16 + 2  # [tokens | write slots]
    torch.testing.assert_close(first[:, 16:], model.write_slots.expand(2, -1, -1))
    torch.testing.assert_close(first[:, :16], model.embed(ids[:, :16]))
    assert second.shape[1] == 2 + 16 + 2  # [memory | tokens | memory]
    torch.testing.assert_close(second[:, :2], second[:, -2:])
    # One call over two windows equals two calls of one window each.
    state = model(ids[:, :16]).state
    torch.testing.assert_close(model(ids[:, 16:], state=state).logits, out.logits[:, 16:], atol=1e-5, rtol=0)


def test_copy_memory_layout_in_a_mixed_batch_matches_a_fresh_row_up_to_mamba():
    # Without Mamba and without a cache to read, a fresh row in a batch with a carried row gets the
    # same logits as alone: its zero read slots are hidden from its tokens.
    model = BakaLM(config(memory_layout="copy_memory", mamba=False)).eval()
    ids = tokens(2, 16)
    carried = model(tokens(1, 32, seed=1)).state  # after two windows: a full-length cache
    state = model.init_state(2)
    state = state.__class__(
        memory=torch.cat((state.memory[:1], carried.memory)),
        keys=tuple(torch.cat((a[:1], b)) for a, b in zip(state.keys, carried.keys)),
        values=tuple(torch.cat((a[:1], b)) for a, b in zip(state.values, carried.values)),
        conv=(),
        ssm=(),
        has_past=torch.tensor([False, True]),
    )
    mixed = model(ids, state=state).logits
    torch.testing.assert_close(mixed[:1], model(ids[:1]).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1:], model(ids[1:], state=carried).logits, atol=1e-5, rtol=0)


def test_first_slot_readout_returns_the_first_positions_of_the_last_layer():
    for readout, layout in (
        ("first_slots", "learned_slots"),
        ("write_slots", "learned_slots"),
        ("first_slots", "copy_memory"),
    ):
        model = BakaLM(config(memory_readout=readout, memory_layout=layout)).eval()
        outputs = []
        model.layers[-1].register_forward_hook(lambda module, args, output: outputs.append(output[0]))
        state = model(tokens(1, 16)).state
        expected = outputs[0][:, :2] if readout == "first_slots" else outputs[0][:, -2:]
        torch.testing.assert_close(state.memory, expected)


def test_pytorch_default_init_draws_embeddings_and_slots_from_unit_normals():
    torch.manual_seed(0)
    model = BakaLM(config(d_model=64, n_heads=4, init="pytorch_default"))
    assert 0.9 < model.embed.weight.std().item() < 1.1
    assert 0.8 < model.write_slots.std().item() < 1.2
    bound = 1 / 64**0.5  # kaiming-uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    weight = model.layers[0].attn.out.weight
    assert weight.abs().max().item() <= bound and weight.abs().max().item() > 0.9 * bound
    ours = BakaLM(config(d_model=64, n_heads=4))
    assert ours.embed.weight.std().item() < 0.03


def test_mamba_every_puts_mamba_on_every_kth_layer_and_state_follows():
    model = BakaLM(config(n_layers=4, mamba_every=2)).eval()
    assert [layer.mamba is not None for layer in model.layers] == [False, True, False, True]
    state = model.init_state(1)
    assert len(state.conv) == 2 and len(state.ssm) == 2
    ids = tokens(1, 32)
    whole = model(ids).logits
    first = model(ids[:, :16])
    torch.testing.assert_close(model(ids[:, 16:], state=first.state).logits, whole[:, 16:], atol=1e-5, rtol=0)


def test_unknown_choice_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="rmsnorm, layernorm"):
        config(norm="batchnorm")
