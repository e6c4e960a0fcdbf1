"""End-to-end training: loss goes down, run directory contents, exact resume, crash safety, errors."""

import json
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bakallm import BakaLM
from bakallm.cli import main
from bakallm.kernels import scan
from bakallm.training import checkpoint as ckpt
from bakallm.training.arguments import TrainConfig
from bakallm.training.trainer import Trainer, planned_schedule

WORDS = "the a cat dog sat ran on under mat tree and then quickly slowly big small red blue house river".split()


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Twelve documents of different lengths, in a learnable pseudo-English."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for index in range(12):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
            for _ in range(rng.randint(3, 25))
        ]
        (folder / f"doc{index:02d}.txt").write_text(" ".join(sentences), encoding="utf-8")
    return folder


def train_args(corpus_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "tiny",
        "--model-config",
        str(_tiny_model_file(run_dir.parent)),
        "--data",
        str(corpus_dir),
        "--tokenizer",
        "bytes",
        "--batch-size",
        "3",
        "--train-ctx",
        "64",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--cache-dir",
        str(run_dir.parent / "cache"),
        "--save-every",
        "4",
        "--threads",
        "1",
        *extra,
    ]


def _tiny_model_file(folder: Path) -> Path:
    path = folder / "tiny-small.json"
    path.write_text(
        json.dumps(
            {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 128, "window": 32, "n_memory": 4, "n_pauses": 4}
        )
    )
    return path


def step_losses(run_dir: Path) -> list[float]:
    with sqlite3.connect(run_dir / "metrics.sqlite3") as connection:
        return [row[0] for row in connection.execute("SELECT loss FROM steps ORDER BY step")]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)


def test_training_lowers_the_loss_and_fills_the_run_directory(corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus_dir, run_dir, "--max-steps", "30")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 30
    losses = step_losses(run_dir)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest.name == "step-00000030"
    for name in (
        ckpt.MODEL_FILE,
        ckpt.OPTIMIZER_FILE,
        ckpt.TRAINER_STATE_FILE,
        ckpt.RECURRENT_STATE_FILE,
        ckpt.RNG_FILE,
    ):
        assert (latest / name).is_file(), name
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 256 and saved["model"]["d_model"] == 64
    assert (
        json.loads((latest / "config.json").read_text()) == saved
    )  # a checkpoint folder describes its model by itself
    assert saved["training"]["batch_size"] == 3
    # keep_last 3 step checkpoints; the corpus is small, so epoch snapshots exist too and stay.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        "step-00000024",
        "step-00000028",
        "step-00000030",
    ]
    assert (run_dir / "checkpoints" / "epoch-1" / ckpt.MODEL_FILE).is_file()
    model = BakaLM.from_pretrained(run_dir)
    for name, tensor in final_weights(run_dir).items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(corpus_dir, tmp_path):
    common = ("--shuffle", "--decay-steps", "12", "--epochs", "100")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(train_args(corpus_dir, straight, "--max-steps", "12", *common)) == 0
    assert main(train_args(corpus_dir, interrupted, "--max-steps", "6", *common)) == 0
    assert main(["train", "--resume", str(interrupted), "--max-steps", "12", "--no-progress"]) == 0
    expected, got = step_losses(straight), step_losses(interrupted)
    assert len(got) == 12
    assert max(abs(a - b) for a, b in zip(expected, got)) <= 1e-6
    reference = final_weights(straight)
    assert (
        max((tensor - reference[name]).abs().max().item() for name, tensor in final_weights(interrupted).items())
        <= 1e-6
    )


def test_epoch_end_keeps_a_snapshot_and_stops(corpus_dir, tmp_path):
    run_dir = tmp_path / "epochs"
    assert main(train_args(corpus_dir, run_dir, "--epochs", "1", "--batch-size", "6", "--train-ctx", "256")) == 0
    assert (run_dir / "checkpoints" / "epoch-1" / ckpt.MODEL_FILE).is_file()
    state = json.loads((ckpt.latest_checkpoint(run_dir) / ckpt.TRAINER_STATE_FILE).read_text())
    assert state["epochs_done"] == 1
    # Every target token of the corpus was seen exactly once in the epoch.
    texts = [p.read_bytes() for p in sorted(corpus_dir.glob("*.txt"))]
    assert state["tokens_seen"] == sum(len(text) - 1 for text in texts)


def test_resume_with_a_different_setting_names_the_field(corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_args(corpus_dir, run_dir, "--max-steps", "2")) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--batch-size", "5"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--batch-size" in error and len(error.splitlines()) == 1
    assert main(train_args(corpus_dir, run_dir, "--max-steps", "2")) == 2
    assert "--resume" in capsys.readouterr().err
    # A value that came from a recipe is named as the recipe's, not as a flag the user never typed.
    recipe = tmp_path / "other.yaml"
    recipe.write_text("lr: 0.01\n")
    assert main(["train", "--resume", str(run_dir), "--recipe", str(recipe)]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        f"the recipe {recipe}'s lr is 0.01 but the run used 0.003" in error
        and "--lr" not in error
        and len(error.splitlines()) == 1
    )


def test_activation_checkpointing_trains_to_the_same_weights(corpus_dir, tmp_path):
    assert main(train_args(corpus_dir, tmp_path / "plain", "--max-steps", "2")) == 0
    assert (
        main(train_args(corpus_dir, tmp_path / "checkpointed", "--max-steps", "2", "--activation-checkpointing")) == 0
    )
    checkpointed = final_weights(tmp_path / "checkpointed")
    for name, tensor in final_weights(tmp_path / "plain").items():
        torch.testing.assert_close(checkpointed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_init_from_starts_from_the_other_runs_weights(corpus_dir, tmp_path, capsys):
    source = tmp_path / "source"
    assert main(train_args(corpus_dir, source, "--max-steps", "2")) == 0
    config = TrainConfig(
        **{**_config_values(corpus_dir, tmp_path / "staged"), "init_from": str(source), "max_steps": 1}
    )
    trainer = Trainer(config)
    assert torch.get_num_threads() == 1  # --threads
    for name, tensor in final_weights(source).items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    wrong = TrainConfig(
        **{**_config_values(corpus_dir, tmp_path / "wrong"), "init_from": str(source), "model_config": None}
    )
    with pytest.raises(Exception, match="model field d_model differs"):
        Trainer(wrong)
    # A field that changes no parameter may differ (stage 2 of a leave-one-out study), and is announced.
    capsys.readouterr()
    values = _config_values(corpus_dir, tmp_path / "switched")
    model_file = Path(values["model_config"])
    model_file.with_name("no-carry.json").write_text(
        json.dumps({**json.loads(model_file.read_text()), "carry_mamba_state": False})
    )
    switched = Trainer(
        TrainConfig(
            **{
                **values,
                "model_config": str(model_file.with_name("no-carry.json")),
                "init_from": str(source),
                "max_steps": 1,
            }
        )
    )
    assert not switched.model.config.carry_mamba_state
    for name, tensor in final_weights(source).items():
        assert torch.equal(switched.model.state_dict()[name], tensor), name
    assert "model fields changed: carry_mamba_state True -> False" in capsys.readouterr().err


def test_init_from_works_for_transformers_runs_and_refuses_the_other_kind(corpus_dir, tmp_path, capsys):
    hf_config = tmp_path / "neox.json"
    hf_config.write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 256,
                "vocab_size": 256,
                "rotary_pct": 0.25,
            }
        )
    )
    hf_args = [
        "train",
        "--hf-config",
        str(hf_config),
        "--data",
        str(corpus_dir),
        "--tokenizer",
        "bytes",
        "--batch-size",
        "2",
        "--train-ctx",
        "64",
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--threads",
        "1",
    ]
    assert main([*hf_args, "--max-steps", "2", "--run-dir", str(tmp_path / "hf-source")]) == 0
    staged = Trainer(
        TrainConfig(
            hf_config=str(hf_config),
            data=str(corpus_dir),
            tokenizer="bytes",
            batch_size=2,
            train_ctx=64,
            max_steps=1,
            run_dir=str(tmp_path / "hf-staged"),
            init_from=str(tmp_path / "hf-source"),
            cache_dir=str(tmp_path / "cache"),
        )
    )
    for name, tensor in final_weights(tmp_path / "hf-source").items():
        assert torch.equal(staged.model.state_dict()[name], tensor), name
    assert (
        main(train_args(corpus_dir, tmp_path / "ours", "--max-steps", "1", "--init-from", str(tmp_path / "hf-source")))
        == 2
    )
    assert "it trained a transformers model and this run trains our model" in capsys.readouterr().err


def _config_values(corpus_dir: Path, run_dir: Path) -> dict:
    return dict(
        preset="tiny",
        model_config=str(_tiny_model_file(run_dir.parent)),
        data=str(corpus_dir),
        tokenizer="bytes",
        batch_size=3,
        train_ctx=64,
        run_dir=str(run_dir),
        progress=False,
        cache_dir=str(run_dir.parent / "cache"),
        save_every=2,
        warmup_steps=1,
        threads=1,
    )


def _poison(trainer, monkeypatch, bad_value, steps):
    """Multiplies the loss by `bad_value` in the given steps (counted from 1), so that the loss and
    every gradient of those steps are not finite, as an overflow makes them."""
    original = trainer.model.forward

    def poisoned(*args, **kwargs):
        output = original(*args, **kwargs)
        if trainer.step + 1 in steps:
            output.loss = output.loss * bad_value
        return output

    monkeypatch.setattr(trainer, "forward_model", poisoned)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_steps_in_a_row_stop_the_run_with_untouched_weights(
    corpus_dir, tmp_path, monkeypatch, capsys, bad_value, precision
):
    trainer = Trainer(
        TrainConfig(**{**_config_values(corpus_dir, tmp_path / "bad"), "max_steps": 10, "precision": precision})
    )
    _poison(trainer, monkeypatch, bad_value, steps=range(4, 11))
    with pytest.raises(
        Exception,
        match="not finite .* in 3 steps in a row \\(4-6\\), which were skipped; the last checkpoint, step-00000004, is kept",
    ):
        trainer.train()
    # Skipped steps never reached the weights: those saved at step 4, and the model now, are step 3's.
    saved = final_weights(trainer.run_dir)
    assert all(torch.isfinite(tensor).all() for tensor in saved.values())
    for name, tensor in trainer.model.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], tensor), name
    assert capsys.readouterr().err.count("step skipped, state reset") == 2


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_a_non_finite_step_is_skipped_counted_and_the_run_goes_on(corpus_dir, tmp_path, monkeypatch, capsys, precision):
    trainer = Trainer(
        TrainConfig(**{**_config_values(corpus_dir, tmp_path / "once"), "max_steps": 6, "precision": precision})
    )
    _poison(trainer, monkeypatch, float("nan"), steps={3})
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    original_step = trainer.optimizer.step
    updates = []
    monkeypatch.setattr(
        trainer.optimizer, "step", lambda *a, **k: (updates.append(trainer.step + 1), original_step(*a, **k))[1]
    )
    summary = trainer.train()
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    assert updates == [1, 2, 4, 5, 6]  # no update at step 3
    assert all(torch.isfinite(tensor).all() for tensor in trainer.model.state_dict().values())
    assert any(not torch.equal(before[name], tensor) for name, tensor in trainer.model.state_dict().items())
    assert (
        "step 3: the gradients are not finite (norm nan); step skipped, state reset (1 skipped in all)"
        in capsys.readouterr().err
    )
    assert (
        json.loads((ckpt.latest_checkpoint(trainer.run_dir) / ckpt.TRAINER_STATE_FILE).read_text())["skipped_steps"]
        == 1
    )


def test_resume_restores_every_random_generator(corpus_dir, tmp_path):
    run_dir = tmp_path / "rng"
    trainer = Trainer(TrainConfig(**{**_config_values(corpus_dir, run_dir), "max_steps": 4}))
    trainer.train_step()
    # What a stochastic layer or data augmentation would draw between steps.
    torch.rand(5)
    random.random()
    trainer.save()
    trainer.metrics.close()
    expected_torch, expected_python = torch.rand(5), random.random()
    torch.manual_seed(123)
    random.seed(123)
    Trainer(TrainConfig(resume=str(run_dir), progress=False)).metrics.close()
    assert torch.equal(torch.rand(5), expected_torch)
    assert random.random() == expected_python


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    with sqlite3.connect(run_dir / "metrics.sqlite3") as connection:
        return list(connection.execute("SELECT step, loss FROM evals ORDER BY step"))


def assert_same_run(expected: Path, got: Path) -> None:
    """Same step losses, evaluations and final weights as the uninterrupted run."""
    want_losses, got_losses = step_losses(expected), step_losses(got)
    assert len(got_losses) == len(want_losses)
    assert max(abs(a - b) for a, b in zip(want_losses, got_losses)) <= 1e-6
    # The interrupted run also evaluated where its first part ended; every evaluation of the
    # uninterrupted run must be there with the same loss.
    got_evaluations = dict(eval_losses(got))
    for step, loss in eval_losses(expected):
        assert abs(got_evaluations[step] - loss) <= 1e-6, step
    reference = final_weights(expected)
    assert max((tensor - reference[name]).abs().max().item() for name, tensor in final_weights(got).items()) <= 1e-6


ACROSS_EPOCHS = (
    "--batch-size",
    "4",
    "--train-ctx",
    "128",
    "--grad-accum",
    "2",
    "--shuffle",
    "--epochs",
    "100",
    "--decay-steps",
    "10",
)


@pytest.fixture(scope="module")
def eval_dir(corpus_dir, tmp_path_factory) -> Path:
    """Two documents of the training corpus: evaluation on, at little cost."""
    folder = tmp_path_factory.mktemp("eval")
    for path in sorted(corpus_dir.glob("*.txt"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def across_epochs_args(corpus_dir: Path, eval_dir: Path, run_dir: Path, max_steps: int) -> list[str]:
    return [
        *train_args(corpus_dir, run_dir, "--max-steps", str(max_steps), *ACROSS_EPOCHS),
        "--eval-data",
        str(eval_dir),
        "--eval-every",
        "3",
    ]


@pytest.fixture(scope="module")
def uninterrupted_across_epochs(corpus_dir, eval_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    args = across_epochs_args(corpus_dir, eval_dir, run_dir, 10)
    assert main(args) == 0
    epochs = [
        epoch
        for (epoch,) in sqlite3.connect(run_dir / "metrics.sqlite3").execute("SELECT epoch FROM steps ORDER BY step")
    ]
    assert epochs[0] == 0 and epochs[-1] >= 1, "the run must cross an epoch end"
    return run_dir


@pytest.mark.parametrize("stop", [4, pytest.param(7, marks=pytest.mark.slow)])
def test_resume_across_an_epoch_end_with_gradient_accumulation_and_evaluation(
    corpus_dir, eval_dir, tmp_path, uninterrupted_across_epochs, stop
):
    run_dir = tmp_path / "interrupted"
    assert main(across_epochs_args(corpus_dir, eval_dir, run_dir, stop)) == 0
    assert main(["train", "--resume", str(run_dir), "--max-steps", "10", "--no-progress"]) == 0
    assert_same_run(uninterrupted_across_epochs, run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*")) == sorted(
        p.name for p in (uninterrupted_across_epochs / "checkpoints").glob("epoch-*")
    )


# A process killed at each stage of saving step 4: while writing the weights, while writing the
# optimizer state, before renaming the finished folder into place, and before LATEST moves to it.
KILL_AT_STAGE = {
    "weights": """
from bakallm.training import checkpoint
real_save_file = checkpoint.save_file
def save_file(tensors, path, *a, **k):
    if "step-00000004" in str(path) and str(path).endswith("model.safetensors"):
        half_written_then_killed(path)
    return real_save_file(tensors, path, *a, **k)
checkpoint.save_file = save_file
""",
    "optimizer": """
real_save = torch.save
def save(obj, path, *a, **k):
    target = str(getattr(path, "name", path))  # a path, or the file object the checkpoint writes through
    if "step-00000004" in target and target.endswith("optimizer.pt"):
        half_written_then_killed(target)
    return real_save(obj, path, *a, **k)
torch.save = save
""",
    "rename": """
real_replace = os.replace
def replace(source, target, *a, **k):
    if str(source).rstrip("/").split("/")[-1].startswith(".tmp-step-00000004"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target, *a, **k)
os.replace = replace
""",
    "LATEST": """
real_replace = os.replace
def replace(source, target, *a, **k):
    if str(target).endswith("LATEST") and os.path.isdir(os.path.join(os.path.dirname(str(target)), "checkpoints", "step-00000004")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target, *a, **k)
os.replace = replace
""",
}


@pytest.fixture(scope="module")
def uninterrupted_short(corpus_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted-short") / "run"
    assert main(train_args(corpus_dir, run_dir, "--max-steps", "6", "--save-every", "2")) == 0
    return run_dir


@pytest.mark.parametrize(
    "stage", [pytest.param(stage, marks=[] if stage == "optimizer" else pytest.mark.slow) for stage in KILL_AT_STAGE]
)
def test_a_run_killed_at_any_stage_of_a_save_resumes_to_the_uninterrupted_result(
    corpus_dir, tmp_path, uninterrupted_short, stage
):
    run_dir = tmp_path / "killed"
    args = train_args(corpus_dir, run_dir, "--max-steps", "6", "--save-every", "2")
    script = "\n".join(
        [
            "import os, signal, sys, torch",
            "def half_written_then_killed(path):",
            "    with open(path, 'wb') as handle:",
            "        handle.write(b'half')",
            "    os.kill(os.getpid(), signal.SIGKILL)",
            textwrap.dedent(KILL_AT_STAGE[stage]),
            "from bakallm.cli import main",
            f"sys.exit(main({args!r}))",
        ]
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000002"
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000006"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert_same_run(uninterrupted_short, run_dir)


def test_recipe_values_apply_and_flags_override_them(tmp_path):
    from bakallm.cli import build_parser
    from bakallm.training.arguments import train_config_from_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("preset: celp18\nbatch-size: 8\nlr: 0.001\nshuffle: true\n")
    args = build_parser("train").parse_args(["train", "--recipe", str(recipe), "--lr", "0.0005"])
    config, explicit = train_config_from_args(args)
    assert (config.preset, config.batch_size, config.lr, config.shuffle) == ("celp18", 8, 0.0005, True)
    assert {"preset", "lr", "recipe"} <= explicit.keys()
    assert (explicit["lr"], explicit["recipe"]) == ("--lr", "--recipe") and explicit[
        "preset"
    ] == f"the recipe {recipe}'s preset"


def test_bad_recipe_and_model_config_fail_with_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 3\n")
    assert main(["train", "--recipe", str(bad)]) == 2
    assert "Unknown training argument(s) batch_sise" in capsys.readouterr().err


@pytest.mark.parametrize("schedule, expected_end", [("constant", 1.0), ("cosine", 0.1), ("linear", 0.1)])
def test_learning_rate_schedules(schedule, expected_end):
    config = TrainConfig(lr=1.0, warmup_steps=4, schedule=schedule, min_lr_ratio=0.1)
    learning_rate = planned_schedule(config, 100).learning_rate
    assert learning_rate(0) == pytest.approx(0.25)
    assert learning_rate(4) == pytest.approx(1.0)
    assert learning_rate(100) == pytest.approx(expected_end)
    assert learning_rate(150) == pytest.approx(expected_end)  # past the horizon the final rate holds


def test_every_training_argument_has_a_flag():
    from dataclasses import fields

    from bakallm.cli import build_parser

    args = build_parser("train").parse_args(["train"])
    assert {field.name for field in fields(TrainConfig)} <= set(vars(args))


def test_scan_flag_sets_the_backend_and_one_that_cannot_run_fails_with_one_sentence(
    corpus_dir, tmp_path, capsys, monkeypatch
):
    trainer = Trainer(
        TrainConfig(**{**_config_values(corpus_dir, tmp_path / "reference"), "scan": "reference", "max_steps": 1})
    )
    assert [layer.mamba.scan for layer in trainer.model.layers] == ["reference", "reference"]
    monkeypatch.setattr(scan, "_triton", {"module": "No module named 'triton'"})
    assert main(train_args(corpus_dir, tmp_path / "triton", "--scan", "triton", "--max-steps", "1")) == 2
    error = capsys.readouterr().err.strip()
    assert "needs the triton package" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "triton").exists()  # refused before anything was written


def step_learning_rates(run_dir: Path) -> list[float]:
    with sqlite3.connect(run_dir / "metrics.sqlite3") as connection:
        return [row[0] for row in connection.execute("SELECT lr FROM steps ORDER BY step")]


def stop_after(trainer: Trainer, step: int) -> None:
    """Sends this process a real SIGINT once `trainer` has taken `step` steps."""
    import os
    import signal

    train_step = trainer.train_step

    def step_then_signal():
        batches = train_step()
        if trainer.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return batches

    trainer.train_step = step_then_signal


def test_a_run_stopped_early_resumes_on_the_schedule_it_planned(corpus_dir, tmp_path, capsys):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(train_args(corpus_dir, straight, "--max-steps", "14", "--shuffle")) == 0
    config, explicit = _parsed(train_args(corpus_dir, stopped, "--max-steps", "14", "--shuffle"))
    trainer = Trainer(config, explicit)
    stop_after(trainer, 7)
    summary = trainer.train()
    assert summary["interrupted"] and summary["steps"] == 7
    assert "Interrupted: saved step 7" in capsys.readouterr().out
    assert main(["train", "--resume", str(stopped), "--no-progress"]) == 0
    assert json.loads((stopped / "config.json").read_text())["training"]["decay_steps"] == 14
    assert step_learning_rates(stopped) == step_learning_rates(straight)
    expected, got = step_losses(straight), step_losses(stopped)
    assert len(got) == 14 and max(abs(a - b) for a, b in zip(expected, got)) <= 1e-6


def _parsed(argv: list[str]):
    from bakallm.cli import build_parser
    from bakallm.training.arguments import train_config_from_args

    return train_config_from_args(build_parser("train").parse_args(argv))


def test_a_longer_resume_holds_the_final_rate_unless_a_new_decay_is_asked(corpus_dir, tmp_path):
    held, redecayed = tmp_path / "held", tmp_path / "redecayed"
    for run_dir in (held, redecayed):
        assert main(train_args(corpus_dir, run_dir, "--max-steps", "8")) == 0
    assert main(["train", "--resume", str(held), "--max-steps", "12", "--no-progress"]) == 0
    rates = step_learning_rates(held)
    floor = 3e-3 * 0.1
    assert rates[7] > floor and rates[8:] == [pytest.approx(floor)] * 4  # the decay ends where step 8 was planned
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates[2:], rates[3:]))  # never up after warm-up
    assert main(["train", "--resume", str(redecayed), "--max-steps", "14", "--new-decay", "--no-progress"]) == 0
    rates = step_learning_rates(redecayed)
    assert rates[:8] == step_learning_rates(held)[:8]
    assert rates[7] < rates[8] < rates[9] == pytest.approx(3e-3)  # warm-up from where the run was back to --lr
    assert rates[9:] == sorted(rates[9:], reverse=True) and rates[-1] < 3e-3 / 2
    assert main(["train", "--resume", str(redecayed), "--max-steps", "15", "--no-progress"]) == 0
    assert step_learning_rates(redecayed)[:14] == rates  # the new decay is saved with the run


def test_epochs_plan_the_steps_the_batcher_really_takes(corpus_dir, tmp_path, capsys):
    for extra in ((), ("--max-doc-tokens", "100", "--grad-accum", "2")):
        run_dir = tmp_path / f"epochs{len(extra)}"
        config, explicit = _parsed(train_args(corpus_dir, run_dir, "--epochs", "2", "--batch-size", "4", *extra))
        trainer = Trainer(config, explicit)
        planned = trainer.planned_steps
        summary = trainer.train()
        assert summary["steps"] == planned and summary["epochs_done"] == 2
        assert json.loads((run_dir / "config.json").read_text())["training"]["decay_steps"] == planned
        lines = capsys.readouterr().out.splitlines()
        step_lines = [line for line in lines if line.startswith("step ")]
        assert len(step_lines) == planned and step_lines[-1].startswith(f"step {planned}/{planned} | epoch ")
        assert [line.split(" done")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1", "epoch 2"]


def test_text_log_lines_every_log_every_steps(corpus_dir, tmp_path, capsys):
    assert main(train_args(corpus_dir, tmp_path / "logged", "--max-steps", "10", "--log-every", "5")) == 0
    lines = [
        line for line in capsys.readouterr().out.splitlines() if not line.startswith(("bakallm train: ", "  "))
    ]  # after the start-up summary
    assert [line.split(" |")[0] for line in lines[:-1]] == ["step 5/10", "step 10/10"]
    fields = [field.split()[0] for field in lines[0].split(" | ")]
    assert fields == ["step", "epoch", "loss", "lr", fields[4], "padding", "ETA"] and lines[0].split(" | ")[4].endswith(
        "tok/s"
    )
    padding = float(lines[0].split("padding ")[1].split("%")[0]) / 100
    with sqlite3.connect(tmp_path / "logged" / "metrics.sqlite3") as connection:
        logged = [row[0] for row in connection.execute("SELECT padding FROM steps WHERE step <= 5")]
    assert padding == pytest.approx(sum(logged) / 5, abs=0.001) and all(0 <= share < 1 for share in logged)


def _start_training(argv: list[str], patch: str = "") -> subprocess.Popen:
    script = f"import sys\n{patch}\nfrom bakallm.cli import main\nsys.exit(main({argv!r}))\n"
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(process: subprocess.Popen, prefix: str) -> str:
    for line in process.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before printing {prefix!r}: {process.stderr.read()}")


def test_first_signal_saves_and_stops_second_stops_at_once(corpus_dir, tmp_path):
    import signal

    run_dir = tmp_path / "signalled"
    process = _start_training(train_args(corpus_dir, run_dir, "--max-steps", "100000", "--save-every", "2"))
    _wait_for_line(process, "step 3/")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130
    step = int(out.split("Interrupted: saved step ")[1].split(";")[0])
    assert ckpt.latest_checkpoint(run_dir).name == ckpt.step_name(step)
    assert f"--resume {run_dir}" in out and "SIGTERM received" in err
    assert main(["train", "--resume", str(run_dir), "--max-steps", str(step + 2), "--no-progress"]) == 0
    assert len(step_losses(run_dir)) == step + 2

    # A second signal while the interrupt's checkpoint is being written: exit at once, the last complete checkpoint stays.
    slow_save = textwrap.dedent(
        f"""
        import pathlib, time
        from bakallm.training import checkpoint
        real_save = checkpoint.save_checkpoint
        def save(run_dir, name, *args, **kwargs):
            if pathlib.Path({str(tmp_path / "interrupting")!r}).exists():
                pathlib.Path({str(tmp_path / "saving")!r}).touch()
                time.sleep(120)
            return real_save(run_dir, name, *args, **kwargs)
        checkpoint.save_checkpoint = save
        """
    )
    run_dir = tmp_path / "twice"
    process = _start_training(train_args(corpus_dir, run_dir, "--max-steps", "100000", "--save-every", "2"), slow_save)
    _wait_for_line(process, "step 3/")
    (tmp_path / "interrupting").touch()
    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while not (tmp_path / "saving").exists():
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    saved_before = ckpt.latest_checkpoint(run_dir).name
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    assert process.returncode == 130
    assert ckpt.latest_checkpoint(run_dir).name == saved_before
    assert (
        main(
            [
                "train",
                "--resume",
                str(run_dir),
                "--max-steps",
                str(int(saved_before.split("-")[1]) + 1),
                "--no-progress",
            ]
        )
        == 0
    )


def test_runs_work_from_any_directory_and_accept_a_moved_corpus(corpus_dir, tmp_path, monkeypatch, capsys):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (tmp_path / "start").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    args = train_args(Path("../corpus"), Path("run"), "--max-steps", "2")
    args[args.index("--model-config") + 1] = "../" + _tiny_model_file(tmp_path).name
    assert main(args) == 0
    saved = json.loads((tmp_path / "start" / "run" / "config.json").read_text())["training"]
    assert saved["data"] == str(corpus) and saved["run_dir"] == str(tmp_path / "start" / "run")
    assert saved["model_config"] == str(tmp_path / "tiny-small.json")
    monkeypatch.chdir(tmp_path)
    run_dir = "start/run"
    assert main(["train", "--resume", run_dir, "--max-steps", "3", "--data", str(corpus), "--no-progress"]) == 0
    moved = tmp_path / "moved"
    corpus.rename(moved)
    capsys.readouterr()
    assert main(["train", "--resume", run_dir, "--max-steps", "4", "--no-progress"]) == 2
    assert "is gone; pass --data with its new location" in capsys.readouterr().err
    assert main(["train", "--resume", run_dir, "--max-steps", "4", "--data", "moved", "--no-progress"]) == 0
    assert len(step_losses(tmp_path / run_dir)) == 4
    (moved / "doc00.txt").write_text("Something else entirely.", encoding="utf-8")
    assert main(["train", "--resume", run_dir, "--max-steps", "5", "--data", "moved", "--no-progress"]) == 2
    assert "holds other content than the run was trained on" in capsys.readouterr().err


def test_resume_is_exact_across_the_rolling_epoch_boundary(corpus_dir, tmp_path):
    common = ("--epochs", "2", "--batch-size", "4", "--train-ctx", "128", "--decay-steps", "30", "--shuffle")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(train_args(corpus_dir, straight, *common)) == 0
    with sqlite3.connect(straight / "metrics.sqlite3") as connection:
        epochs = [row[0] for row in connection.execute("SELECT epoch FROM steps ORDER BY step")]
    boundary = epochs.index(1)  # steps 1..boundary belong to epoch 0; the last of them ends it
    assert main(train_args(corpus_dir, stopped, *common, "--max-steps", str(boundary - 1))) == 0
    rows = json.loads((ckpt.latest_checkpoint(stopped) / ckpt.TRAINER_STATE_FILE).read_text())["batcher"]
    busy_epochs = {epoch for epoch, unit in zip(rows["row_epochs"], rows["row_documents"]) if unit != -1}
    assert busy_epochs == {0, 1}  # the checkpoint holds rows of both epochs
    assert main(["train", "--resume", str(stopped), "--max-steps", str(len(epochs)), "--no-progress"]) == 0
    expected, got = step_losses(straight), step_losses(stopped)
    assert len(got) == len(expected) and max(abs(a - b) for a, b in zip(expected, got)) <= 1e-6
    assert step_learning_rates(stopped) == step_learning_rates(straight)


def test_threads_default_to_omp_num_threads_else_the_cpus_this_process_may_use(monkeypatch):
    import os

    from bakallm.acceleration import use_threads

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        assert use_threads(None) == 3 and torch.get_num_threads() == 3
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own setting wins over the CPU count
        assert use_threads(None) == 2 and torch.get_num_threads() == 2
        assert use_threads(1) == 1
        monkeypatch.setenv(
            "LOCAL_WORLD_SIZE", "3"
        )  # under torchrun, which sets OMP_NUM_THREADS=1 itself: a share of the CPUs
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert use_threads(None) == 1  # 3 CPUs among 3 ranks
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
        assert use_threads(None) == 2
    finally:
        torch.set_num_threads(before)


def test_padding_warning_names_the_long_document_and_a_split_that_removes_it():
    from bakallm.data.batching import DocumentBatcher
    from bakallm.data.token_cache import TokenizedCorpus
    from bakallm.training.trainer import padding_warning

    def batcher(lengths, **settings):
        corpus = TokenizedCorpus.from_token_lists([[1] * n for n in lengths], vocab_size=2)
        return DocumentBatcher(corpus, 4, 8, max_epochs=1, **settings)

    # One 401-token document and 20 of 9: 560 targets fill 18 batches of 4 x 8, but the long one needs 50.
    lopsided = batcher([401] + [9] * 20)
    warning = padding_warning(lopsided, lopsided.count_batches())
    assert warning.startswith(
        "1 epoch(s) will take 50 batches where the tokens fill 18 (about 64% padding): the longest document (400 tokens)"
    )
    assert warning.endswith("cut documents with --max-doc-tokens 32 or use fewer --batch-size rows.")
    split = batcher([401] + [9] * 20, max_doc_tokens=32)
    assert padding_warning(split, split.count_batches()) is None  # the advice works
    balanced = batcher([101] * 8)
    assert padding_warning(balanced, balanced.count_batches()) is None
    assert padding_warning(batcher([401] + [9] * 20, mode="windows"), 50) is None
    endless = DocumentBatcher(TokenizedCorpus.from_token_lists([[1] * 401, [1] * 9], vocab_size=2), 4, 8)
    assert padding_warning(endless, 50) is None  # rows roll into the next epoch: no drain until --max-steps


def test_a_transformers_model_gives_the_same_loss_and_gradients_without_its_logits(tmp_path):
    from bakallm.kinds.hf import build_hf_model

    config = tmp_path / "neox.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "gpt_neox",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "max_position_embeddings": 256,
                "vocab_size": 300,
                "rotary_pct": 0.25,
            }
        )
    )
    torch.manual_seed(0)
    model = build_hf_model(str(config), {}, vocab_size=260)
    assert model._plain_head() is not None
    ids = torch.randint(0, 260, (2, 40))
    targets = torch.randint(0, 260, (2, 40))
    targets[torch.rand(targets.shape) < 0.7] = -100
    losses, gradients = [], []
    for return_logits in (False, True):  # the chunked head at scored positions, then the library's logits
        model.zero_grad()
        loss = model(ids, targets=targets, return_logits=return_logits).loss
        loss.backward()
        losses.append(loss.detach())
        gradients.append(
            {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}
        )
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_help_shows_each_fields_own_default():
    """Help texts take their defaults from TrainConfig: a default changed there cannot leave a stale help."""
    import argparse
    import re
    from dataclasses import fields

    from bakallm.commands.train import add_arguments
    from bakallm.training.arguments import default_text

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    by_name = {action.dest: action.help or "" for action in parser._actions}
    checked = 0
    for field in fields(TrainConfig):
        shown = default_text(field.name)
        help_text = by_name.get(field.name, "")
        stated = re.findall(r"\(default ([^\s:;()]+)\)", help_text)  # plain values, not defaults told in words
        if shown is not None and "(default" not in help_text.replace(shown, ""):  # else told in words, e.g. "(default)"
            assert shown in help_text, field.name
            checked += 1
        for value in stated if shown is not None else ():  # a plain default written by hand must be the field's
            assert f"(default {value})" == shown, (field.name, value)
    assert checked >= 20


def test_the_train_parser_has_one_flag_per_field_and_no_other():
    """The parser is derived from TrainConfig: every field has its flag, parsed to the field's type, and nothing else."""
    import argparse
    from dataclasses import fields

    from bakallm.commands.train import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {action.dest for action in parser._actions} - {"help"}
    assert dests == {field.name for field in fields(TrainConfig)}
    args = parser.parse_args(["--batch-size", "3", "--lr", "0.5", "--no-carry-state", "--compile", "--data", "x.txt"])
    assert (args.batch_size, args.lr, args.carry_state, args.compile, args.data, args.epochs) == (
        3,
        0.5,
        False,
        True,
        "x.txt",
        None,
    )


def test_the_resume_rules_and_path_kinds_are_field_metadata():
    from bakallm.training.arguments import ALWAYS_LOCAL, PATH_ARGUMENTS, RELOCATABLE_ARGUMENTS, RESUMABLE_CHANGES

    assert {
        "batch_size",
        "max_steps",
        "device",
        "threads",
        "scan",
    } <= RESUMABLE_CHANGES and "lr" not in RESUMABLE_CHANGES
    assert RELOCATABLE_ARGUMENTS == {"data", "tokenizer", "model_config"}
    assert set(ALWAYS_LOCAL) == {"run_dir", "resume", "cache_dir"} and set(ALWAYS_LOCAL) < set(PATH_ARGUMENTS)


@pytest.mark.parametrize("keep", [True, False])
def test_training_on_a_cpu_keeps_freed_host_memory_unless_told_not_to(corpus_dir, tmp_path, monkeypatch, keep):
    calls = []
    monkeypatch.setattr("bakallm.training.trainer.keep_freed_host_memory", lambda: calls.append(True))
    config = TrainConfig(**_config_values(corpus_dir, tmp_path / "run"), keep_host_memory=keep, device="cpu")
    Trainer(config)
    assert calls == ([True] if keep else [])
