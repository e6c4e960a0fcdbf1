import json

import pytest
import torch

from bakallm import BakaLM, ModelConfig


def test_presets_have_the_documented_shapes():
    celp = ModelConfig.preset("celp18")
    assert (celp.d_model, celp.n_layers, celp.n_heads, celp.d_ff, celp.window, celp.n_memory, celp.n_pauses) == (
        768,
        8,
        12,
        3072,
        512,
        16,
        8,
    )
    assert celp.padded_vocab_size == 50304 and celp.padded_vocab_size % 64 == 0
    assert celp.carry_mamba_state and not ModelConfig.preset("celp18-seed").carry_mamba_state
    assert ModelConfig.preset("tiny").d_model == 128


def parameters_written_out(config: ModelConfig) -> int:
    """The parameter count of a BakaLM, tensor by tensor."""
    d, vocab, d_inner, rank, n_state = (
        config.d_model,
        config.padded_vocab_size,
        config.d_inner,
        config.dt_rank,
        config.mamba_d_state,
    )
    attention = 3 * d * d + d * d
    mlp = 3 * d * config.d_ff
    mamba = (
        d * 2 * d_inner  # in_proj
        + d_inner * config.mamba_d_conv
        + d_inner  # depthwise conv and its bias
        + d_inner * (rank + 2 * n_state)  # x_proj
        + rank * d_inner
        + d_inner  # dt_proj
        + d_inner * n_state
        + d_inner  # A_log, D
        + d_inner * d  # out_proj
    )
    layer = d + attention + mlp + (d + mamba if config.mamba else 0)  # two RMSNorm weights with Mamba
    slots = (config.n_pauses + 2 * config.n_memory) * d  # pauses, initial memory, write slots
    head = 0 if config.tie_embeddings else vocab * d
    return vocab * d + slots + config.n_layers * layer + d + head


@pytest.mark.parametrize(
    "preset, total, embedding",
    # celp18-seed (LayerNorm with bias, one shared pause, no initial memory) is counted exactly
    # against the reference code's figure in tests/test_seed_options.py.
    [("celp18", 182_975_232, 77_266_944), ("tiny", 14_396_032, 12_877_824)],
)
def test_parameter_counts_are_exactly_the_documented_ones(preset, total, embedding):
    config = ModelConfig.preset(preset)
    with torch.device("meta"):
        counts = BakaLM(config).num_parameters()
    assert counts == {"total": total, "embedding": embedding, "non_embedding": total - embedding}
    assert parameters_written_out(config) == total
    tied = config.replace(tie_embeddings=True)
    with torch.device("meta"):
        assert BakaLM(tied).num_parameters()["total"] == parameters_written_out(tied) == total - embedding // 2


def test_json_round_trip(tmp_path):
    config = ModelConfig.preset("tiny", vocab_size=300, n_pauses=8)
    assert ModelConfig.from_json(config.to_json()) == config
    path = tmp_path / "model.json"
    path.write_text(config.to_json())
    assert ModelConfig.from_json(path) == config
    assert json.loads(config.to_json())["vocab_size"] == 300


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 5}, "must divide d_model"),
        ({"n_pauses": 3}, "divisible by n_pauses"),
        ({"d_model": 0}, "positive integer"),
        ({"n_memory": -1}, "non-negative"),
        ({"elephant_d": 0.0}, "elephant"),
    ],
)
def test_inconsistent_fields_raise_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **changes)


def test_unknown_fields_and_presets_are_named():
    with pytest.raises(ValueError, match="d_modle"):
        ModelConfig.from_dict({"d_modle": 3})
    with pytest.raises(ValueError, match="Unknown model preset 'huge'"):
        ModelConfig.preset("huge")


def test_differences_name_the_changed_fields():
    base = ModelConfig.preset("tiny")
    assert base.differences(base.replace(window=64, n_pauses=2)) == ["window", "n_pauses"]
