"""A write that fails for want of space, injected for real with a file-size limit (RLIMIT_FSIZE, as
`ulimit -f` sets it: every write past the limit fails with EFBIG): one sentence naming the file,
exit status 2, what was saved before intact, and the same command succeeds once there is room."""

import contextlib
import json
import resource
import signal
import sqlite3

import pytest

from bakallm import BakaLM, ModelConfig
from bakallm.atomic import no_room_reason, write_text_atomic
from bakallm.cli import main
from bakallm.errors import UserError
from bakallm.training import checkpoint as ckpt

pytestmark = pytest.mark.skipif(
    not hasattr(resource, "RLIMIT_FSIZE"), reason="needs a POSIX file-size limit (RLIMIT_FSIZE)"
)


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """Every file write of this process past `max_bytes` fails with EFBIG, as under `ulimit -f`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for index in range(4):
        (folder / f"doc{index}.txt").write_text(
            f"document {index}: " + "the cat sat on the mat. " * 200, encoding="utf-8"
        )
    return folder


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one_and_the_run_resumes(
    corpus, tmp_path, capsys, small_train_args
):
    run_dir = tmp_path / "run"
    assert (
        main(small_train_args(tmp_path, corpus, "--save-every", "2", "--max-steps", "2", "--run-dir", str(run_dir)))
        == 0
    )
    before = {path.name: path.read_bytes() for path in (ckpt.latest_checkpoint(run_dir)).iterdir()}
    weights_size = len(before[ckpt.MODEL_FILE])
    capsys.readouterr()
    with file_size_limit(weights_size // 2):
        assert main(["train", "--resume", str(run_dir), "--max-steps", "4", "--no-progress"]) == 2
    error = _one_error_line(capsys)
    assert error.startswith(
        f"bakallm train: error: Could not save checkpoint {run_dir.resolve() / 'checkpoints' / 'step-00000004'}: "
        "the file-size limit (ulimit -f) was reached; the last complete checkpoint, step-00000002, is unchanged"
    )
    assert f"bakallm train --resume {run_dir.resolve()}" in error
    assert (run_dir / ckpt.LATEST_FILE).read_text().strip() == "step-00000002"
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == [
        "step-00000002"
    ]  # no half-written folder
    assert {path.name: path.read_bytes() for path in ckpt.latest_checkpoint(run_dir).iterdir()} == before
    # With room again, the same command continues the run.
    assert main(["train", "--resume", str(run_dir), "--max-steps", "4", "--no-progress"]) == 0
    assert (run_dir / ckpt.LATEST_FILE).read_text().strip() == "step-00000004"


def test_a_token_cache_that_does_not_fit_is_not_left_half_written(corpus, tmp_path, capsys, small_train_args):
    args = small_train_args(
        tmp_path, corpus, "--save-every", "2", "--max-steps", "1", "--run-dir", str(tmp_path / "run")
    )
    with file_size_limit(2000):  # the corpus is 19 kB of tokens
        assert main(args) == 2
    error = _one_error_line(capsys)
    assert (
        "Could not write the token cache " in error
        and "the file-size limit (ulimit -f) was reached" in error
        and "--cache-dir" in error
    )
    assert list((tmp_path / "cache").iterdir()) == []
    assert main(args) == 0


def test_a_results_row_that_does_not_fit_leaves_the_database_readable(tmp_path, capsys):
    from bakallm.results.db import ResultRow, ResultsDB

    path = tmp_path / "results.sqlite3"
    with ResultsDB(path) as db:
        db.add(
            ResultRow(
                model_kind="bakallm",
                model_name="kept",
                benchmark="b",
                split="test",
                n_ctx=1,
                tokens=1,
                loss=1.0,
                ppl=2.7,
            )
        )
    size = path.stat().st_size
    big = ResultRow(
        model_kind="bakallm",
        model_name="big",
        benchmark="b",
        split="test",
        n_ctx=1,
        tokens=1,
        loss=1.0,
        ppl=2.7,
        note="x" * 200_000,
    )
    with ResultsDB(path) as db, file_size_limit(size + 4096), pytest.raises(UserError) as raised:
        db.add(big)
    assert str(raised.value).startswith(
        f"Could not add a row to {path}: "
    ) and "the rows stored before are unchanged" in str(raised.value)
    with ResultsDB(path) as db:
        assert [row.model_name for row in db.rows()] == ["kept"]
        db.add(big)
    assert [name for (name,) in sqlite3.connect(path).execute("SELECT model_name FROM results ORDER BY id")] == [
        "kept",
        "big",
    ]


def test_an_export_that_does_not_fit_leaves_no_folder_and_succeeds_later(tmp_path, capsys):
    config = ModelConfig.preset(
        "tiny", vocab_size=256, d_model=32, n_layers=1, n_heads=2, d_ff=64, window=16, n_memory=2, n_pauses=2
    )
    model = BakaLM(config)
    ckpt.write_run_config(tmp_path / "run", config.to_dict(), {"tokenizer": "bytes"})
    ckpt.save_checkpoint(tmp_path / "run", "step-00000001", ckpt.savable_weights(model), {}, {}, None, {}, keep_last=1)
    out = tmp_path / "exported"
    with file_size_limit(1000):
        assert main(["export", str(tmp_path / "run"), str(out)]) == 2
    error = _one_error_line(capsys)
    assert f"Could not write {out / 'model.safetensors'}: the file-size limit (ulimit -f) was reached" in error
    assert not out.exists()
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "bakallm"


def test_an_atomic_write_that_does_not_fit_keeps_the_old_file(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text("old", encoding="utf-8")
    with file_size_limit(100), pytest.raises(UserError, match=f"Could not write {path}: the file-size limit"):
        write_text_atomic(path, "new" * 1000)
    assert path.read_text(encoding="utf-8") == "old"
    assert [child.name for child in tmp_path.iterdir()] == ["settings.json"]  # no temporary left


def test_no_room_is_recognised_behind_the_errors_of_libraries():
    import errno

    assert no_room_reason(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert (
        no_room_reason(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"))
        == "the file-size limit (ulimit -f) was reached"
    )
    assert no_room_reason(sqlite3.OperationalError("database or disk is full")) == "the disk is full"
    wrapped = RuntimeError("unexpected pos 640 vs 534")
    wrapped.__context__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert no_room_reason(wrapped) == "the disk quota is used up"
    assert no_room_reason(ValueError("something else")) is None


def test_an_ablation_data_file_that_does_not_fit_is_not_left_half_written(corpus, tmp_path):
    from bakallm.ablation import write_corpus

    folder = tmp_path / "data"
    with file_size_limit(5000), pytest.raises(UserError, match="Could not write .*train-.*jsonl: the file-size limit"):
        write_corpus([str(corpus)], folder, "train")
    assert list(folder.iterdir()) == []
    path = write_corpus([str(corpus)], folder, "train")
    assert len(path.read_text(encoding="utf-8").splitlines()) == 4
