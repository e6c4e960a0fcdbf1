"""Damaged files: a truncated or garbage checkpoint file, a LATEST naming a missing step, a damaged
config.json, a results database that is not SQLite. Every command says which file is damaged in
one sentence; resume continues from the newest complete checkpoint, with a warning."""

import pytest
from safetensors.torch import load_file

from bakallm.cli import main
from bakallm.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for index in range(3):
        (folder / f"doc{index}.txt").write_text(
            f"story {index}: " + "the cat sat on the mat and ran. " * 80, encoding="utf-8"
        )
    return folder


def _train(train_args, corpus, run_dir, *extra):
    return main(
        train_args(run_dir.parent, corpus, "--save-every", "2", "--keep-last", "3", "--run-dir", str(run_dir), *extra)
    )


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory, small_train_args):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert _train(small_train_args, corpus, run_dir, "--max-steps", "6") == 0
    return run_dir


@pytest.fixture
def run(corpus, tmp_path, capsys, small_train_args):
    """A run saved at steps 2 and 4 (LATEST), planned for 6."""
    run_dir = tmp_path / "run"
    assert _train(small_train_args, corpus, run_dir, "--max-steps", "4", "--decay-steps", "6") == 0
    capsys.readouterr()
    return run_dir


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


DAMAGE = {
    "truncated weights": (ckpt.MODEL_FILE, lambda data: data[: len(data) // 2]),
    "garbage optimizer": (ckpt.OPTIMIZER_FILE, lambda data: b"\x00garbage" * 50),
    "truncated rng": (ckpt.RNG_FILE, lambda data: data[:10]),
    "damaged trainer state": (ckpt.TRAINER_STATE_FILE, lambda data: b"{not json"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_continues_from_the_newest_complete_checkpoint_with_a_warning(run, uninterrupted, capsys, damage):
    name, change = DAMAGE[damage]
    path = run / "checkpoints" / "step-00000004" / name
    path.write_bytes(change(path.read_bytes()))
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "warning" in line)
    assert warning.startswith(f"bakallm train: warning: step-00000004 is damaged ({name}: ")
    assert warning.endswith("resuming from step-00000002, the newest complete checkpoint")
    assert ckpt.latest_checkpoint(run).name == "step-00000006"
    expected = load_file(ckpt.latest_checkpoint(uninterrupted) / ckpt.MODEL_FILE)
    resumed = load_file(ckpt.latest_checkpoint(run) / ckpt.MODEL_FILE)
    assert all((resumed[key] == value).all() for key, value in expected.items())  # the same run as without the damage


def test_a_latest_naming_a_missing_checkpoint_resumes_from_the_newest_and_bench_names_it(run, capsys, tmp_path):
    (run / "LATEST").write_text("step-00000099\n")
    assert main(["bench", str(run), "--db", str(tmp_path / "r.sqlite3"), "--no-progress"]) == 2
    assert _error(capsys) == (
        f"bakallm bench: error: {run / 'LATEST'} names checkpoint 'step-00000099', which is missing; "
        "pass one of its checkpoint folders (step-00000002, step-00000004)."
    )
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 0
    assert "LATEST names 'step-00000099', which is missing: resuming from step-00000004" in capsys.readouterr().err


def test_every_checkpoint_damaged_is_one_sentence(run, capsys):
    for step in ("step-00000002", "step-00000004"):
        (run / "checkpoints" / step / ckpt.MODEL_FILE).write_bytes(b"x")
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 2
    error = _error(capsys)
    assert error.startswith(
        f"bakallm train: error: {run.resolve()} holds no complete checkpoint: step-00000004 is damaged (model.safetensors: "
    )
    assert error.endswith("start a new run with --run-dir.")


@pytest.mark.parametrize("command", ["bench", "generate", "export"])
def test_damaged_weights_and_config_are_named_by_every_command(run, capsys, tmp_path, command):
    extra = {
        "bench": ["--db", str(tmp_path / "r.sqlite3"), "--no-progress"],
        "generate": ["--prompt", "the cat", "--max-new-tokens", "2"],
        "export": [str(tmp_path / "exported")],
    }[command]
    weights = run / "checkpoints" / "step-00000004" / ckpt.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    assert main([command, str(run), *extra]) == 2
    assert _error(capsys).startswith(f"bakallm {command}: error: {weights} is corrupted or unreadable")
    # The run's config and the copy in the checkpoint, which describes the model on its own.
    for config in (run / "config.json", weights.parent / "config.json"):
        config.write_text("{ damaged")
    assert main([command, str(run), *extra]) == 2
    error = _error(capsys)
    assert any(
        error.startswith(f"bakallm {command}: error: Cannot read {config} (")
        for config in (run / "config.json", weights.parent / "config.json")
    ), error
    assert not (tmp_path / "exported").exists()


def test_a_results_database_that_is_not_sqlite_is_named(tmp_path, capsys):
    db = tmp_path / "results.sqlite3"
    db.write_bytes(b"this is not a database" * 100)
    assert main(["results", "--db", str(db)]) == 2
    assert _error(capsys).startswith(f"bakallm results: error: {db} is not a readable results database")
    assert db.read_bytes() == b"this is not a database" * 100  # left as it was


def test_resume_with_a_damaged_config_names_it(run, capsys):
    (run / "config.json").write_text("{ damaged")
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--no-progress"]) == 2
    assert _error(capsys).startswith(f"bakallm train: error: Cannot read {run / 'config.json'} (")
