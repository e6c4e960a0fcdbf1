"""The reference system's training options: its recipe, weight decay on every parameter, pure bfloat16."""

from pathlib import Path

import pytest
import torch

from bakallm.training.arguments import read_recipe, train_config_from_values
from bakallm.training.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path, one_torch_thread) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(3):
        (folder / f"doc{index}.txt").write_text(" ".join(["the cat sat on the mat"] * (20 + index)), encoding="utf-8")
    return folder


def trainer(corpus: Path, tmp_path: Path, **changes) -> Trainer:
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_file = tmp_path / "model.json"
    model_file.write_text(
        '{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "window": 32, "n_memory": 2, "n_pauses": 2}'
    )
    values = dict(
        preset="celp18-seed",
        model_config=str(model_file),
        data=str(corpus),
        tokenizer="bytes",
        batch_size=2,
        train_ctx=64,
        max_steps=1,
        run_dir=str(tmp_path / "run"),
        progress=False,
        cache_dir=str(tmp_path / "cache"),
        warmup_steps=0,
        device="cpu",
    )
    values.update(changes)
    return Trainer(train_config_from_values(values))


def test_seed_recipe_holds_the_reference_optimizer_and_order():
    config = train_config_from_values(read_recipe(str(REPO_ROOT / "recipes" / "celp18-seed.yaml")))
    config.validate()
    assert (config.preset, config.lr, config.beta1, config.beta2, config.weight_decay) == (
        "celp18-seed",
        1e-3,
        0.9,
        0.999,
        0.01,
    )
    assert (
        config.weight_decay_scope,
        config.schedule,
        config.warmup_steps,
        config.shuffle,
        config.carry_state,
        config.precision,
    ) == ("all", "constant", 0, False, False, "pure-bfloat16")


def test_weight_decay_scope_all_decays_every_parameter(corpus, tmp_path):
    everything = trainer(corpus, tmp_path, weight_decay_scope="all", weight_decay=0.01)
    (group,) = everything.optimizer.param_groups
    assert group["weight_decay"] == 0.01 and len(group["params"]) == len(list(everything.model.parameters()))
    matrices = trainer(corpus, tmp_path / "b", weight_decay=0.01)
    decayed, plain = matrices.optimizer.param_groups
    assert plain["weight_decay"] == 0.0 and any(p is matrices.model.write_slots for p in plain["params"])
    # Decay on a norm's gain shows in one step with no gradient signal: 1 - lr * wd.
    everything.optimizer.zero_grad()
    gain = everything.model.final_norm.weight
    before = gain.detach().clone()
    for parameter in everything.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    everything.optimizer.step()
    torch.testing.assert_close(gain.detach(), before * (1 - everything.config.lr * 0.01))


def test_pure_bfloat16_keeps_weights_and_optimizer_state_in_bfloat16(corpus, tmp_path):
    run = trainer(corpus, tmp_path, precision="pure-bfloat16")
    run.train_step()
    assert {p.dtype for p in run.model.parameters()} == {torch.bfloat16}
    moments = [state["exp_avg"] for state in run.optimizer.state.values()]
    assert moments and {moment.dtype for moment in moments} == {torch.bfloat16}
    assert run.autocast_dtype is None
