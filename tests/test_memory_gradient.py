"""The memory write slots learn only when a training step spans two windows or more (docs/quality.md)."""

from pathlib import Path

import pytest
import torch

from bakallm import BakaLM, ModelConfig
from bakallm.kinds.ours import build_model_config, untrained_memory_warning
from bakallm.training.arguments import read_recipe, train_config_from_values

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = ModelConfig.preset(
    "tiny", vocab_size=64, d_model=32, n_heads=2, n_layers=2, d_ff=64, window=16, n_memory=4, n_pauses=2
)


def write_slot_gradient(windows_per_step: int) -> float:
    """The gradient norm of the write slots after one step of `windows_per_step` windows from a carried state."""
    model = BakaLM(CONFIG)
    tokens = torch.randint(0, 64, (2, 1 + (1 + windows_per_step) * CONFIG.window))
    with torch.no_grad():
        state = model(tokens[:, : CONFIG.window], return_logits=False).state
    step = tokens[:, CONFIG.window :]
    model(step[:, :-1], state=state.detach(), targets=step[:, 1:], return_logits=False).loss.backward()
    return float(model.write_slots.grad.norm())


def test_write_slots_get_no_gradient_from_one_window_steps_and_some_from_two():
    assert write_slot_gradient(1) == 0.0
    assert write_slot_gradient(2) > 1e-6


def test_the_trainer_warns_exactly_when_the_memory_cannot_learn():
    assert "memory write slots get no gradient" in untrained_memory_warning(16, CONFIG)
    assert "use --train-ctx 32 or more" in untrained_memory_warning(31, CONFIG)
    assert untrained_memory_warning(32, CONFIG) is None
    assert untrained_memory_warning(16, CONFIG.replace(n_memory=0)) is None


@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO_ROOT / "recipes").glob("*.yaml")))
def test_no_shipped_recipe_leaves_the_memory_untrained(recipe, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name their model config files relative to the repository
    config = train_config_from_values(read_recipe(f"recipes/{recipe}"))
    assert untrained_memory_warning(config.train_ctx, build_model_config(config.to_dict(), vocab_size=50277)) is None
