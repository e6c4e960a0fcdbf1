import json

import pytest

from bakallm import BakaLM, ModelConfig


def test_presets_have_the_documented_shapes():
    celp = ModelConfig.preset("celp18")
    assert (celp.d_model, celp.n_layers, celp.n_heads, celp.d_ff, celp.window, celp.n_memory, celp.n_pauses) == (768, 8, 12, 3072, 512, 16, 8)
    assert celp.padded_vocab_size == 50304 and celp.padded_vocab_size % 64 == 0
    assert celp.carry_mamba_state and not ModelConfig.preset("celp18-seed").carry_mamba_state
    assert ModelConfig.preset("tiny").d_model == 128


def test_celp18_parameter_count_matches_the_reference_within_two_percent():
    with __import__("torch").device("meta"):
        counts = BakaLM(ModelConfig.preset("celp18")).num_parameters()
    assert counts["total"] == pytest.approx(183e6, rel=0.02)
    assert counts["non_embedding"] == pytest.approx(106e6, rel=0.02)


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
