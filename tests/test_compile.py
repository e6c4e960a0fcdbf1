"""torch.compile: after warm-up, training steps and evaluation windows trigger no recompilation."""

import json
import math
import random
import sqlite3

import pytest
import torch
from torch._dynamo.utils import counters

from bakallm import BakaLM, ModelConfig
from bakallm.acceleration import compile_layers
from bakallm.training.arguments import TrainConfig
from bakallm.training.trainer import Trainer


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_training_steps_and_evaluation_windows_compile_once():
    torch._dynamo.reset()
    counters.clear()
    config = ModelConfig.preset(
        "tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, window=32, n_memory=4, n_pauses=4
    )
    model = compile_layers(
        BakaLM(config), backend="eager"
    )  # Dynamo's guards decide recompilation, whatever the backend
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    state = model.init_state(3)

    def train_step(step: int):
        nonlocal state
        ids = torch.randint(0, 256, (3, 64), generator=generator)
        targets = torch.randint(0, 256, (3, 64), generator=generator)
        targets[step % 3, 40:] = -100  # a document ending inside the step
        reset = torch.tensor([step % 3 == row for row in range(3)])
        output = model(ids, state=state, reset=reset, targets=targets, return_logits=False)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = output.state.detach()

    def evaluation_window(eval_state):
        with torch.no_grad():
            return model(torch.randint(0, 256, (3, 32), generator=generator), state=eval_state).state

    for step in range(2):
        train_step(step)
    eval_state = evaluation_window(model.init_state(3))
    after_warm_up = compiled_graphs()
    assert after_warm_up > 0
    for step in range(2, 6):
        train_step(step)
    for _ in range(3):
        eval_state = evaluation_window(eval_state)
    assert compiled_graphs() == after_warm_up
    assert counters["stats"]["unique_graphs"] == after_warm_up


@pytest.mark.slow
def test_trainer_and_evaluator_compiled_under_bfloat16_autocast_never_recompile(tmp_path):
    """Trainer(compile=True) with inductor and bf16 autocast: after one training step and one evaluation,
    further steps (documents ending, rows resetting) and evaluations compile nothing new and agree with eager."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for index in range(5):
        words = " ".join(
            rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "ran"]) for _ in range(rng.randint(20, 90))
        )
        (corpus / f"doc{index}.txt").write_text(words, encoding="utf-8")
    model_file = tmp_path / "model.json"
    model_file.write_text(
        json.dumps(
            {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "window": 32, "n_memory": 4, "n_pauses": 4}
        )
    )

    def trainer(compiled: bool) -> Trainer:
        return Trainer(
            TrainConfig(
                preset="tiny",
                model_config=str(model_file),
                data=str(corpus),
                tokenizer="bytes",
                batch_size=3,
                train_ctx=64,
                run_dir=str(tmp_path / f"run-{compiled}"),
                cache_dir=str(tmp_path / "cache"),
                progress=False,
                compile=compiled,
                precision="bfloat16",
                device="cpu",
                eval_data=str(corpus),
                eval_n_ctx=64,
                max_steps=100,
                warmup_steps=1,
                epochs=100,
            )
        )

    def run(compiled: bool) -> tuple[list[float], list[float]]:
        trainer_ = trainer(compiled)
        assert trainer_.autocast_dtype == torch.bfloat16
        evaluations = []
        for phase in range(2):
            with torch._dynamo.config.patch(error_on_recompile=compiled and phase == 1):
                for _ in range(3):
                    trainer_.train_step()
                evaluations.append(trainer_.evaluate()["loss"])
        trainer_.save()  # writes the step losses to the metrics database
        trainer_.metrics.close()
        with sqlite3.connect(trainer_.run_dir / "metrics.sqlite3") as connection:
            losses = [loss for (loss,) in connection.execute("SELECT loss FROM steps ORDER BY step")]
        assert len(losses) == 6
        return losses, evaluations

    torch._dynamo.reset()
    counters.clear()
    compiled_losses, compiled_evaluations = run(compiled=True)
    assert compiled_graphs() > 0
    eager_losses, eager_evaluations = run(compiled=False)
    assert all(math.isfinite(loss) for loss in compiled_losses + compiled_evaluations)
    assert (
        max(abs(a - b) for a, b in zip(compiled_losses + compiled_evaluations, eager_losses + eager_evaluations)) < 0.05
    )
