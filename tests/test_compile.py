"""torch.compile: after warm-up, training steps and evaluation windows trigger no recompilation."""

import torch
from torch._dynamo.utils import counters

from bakallm import BakaLM, ModelConfig
from bakallm.acceleration import compile_layers


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_training_steps_and_evaluation_windows_compile_once():
    torch._dynamo.reset()
    counters.clear()
    config = ModelConfig.preset("tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, window=32, n_memory=4, n_pauses=4)
    model = compile_layers(BakaLM(config), backend="eager")  # Dynamo's guards decide recompilation, whatever the backend
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
