"""Several processes on one run directory, one results database or one study folder: nothing lost,
nothing done twice, and a lock that a crashed process never leaves stuck."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from bakallm.ablation import DONE_FILE
from bakallm.cli import main
from bakallm.locks import Busy, RunLock

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="run directory locks need POSIX flock")

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from bakallm.locks import RunLock
    lock = RunLock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def lock_holder(tmp_path):
    """Starts a process that holds the lock of a folder; yields (folder, process); kills it at the end."""
    processes = []

    def start(folder):
        process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "locked"
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.kill()
        process.wait()


def test_a_lock_held_elsewhere_is_refused_with_its_pid_and_freed_when_that_process_dies(tmp_path, lock_holder):
    folder = tmp_path / "run"
    holder = lock_holder(folder)
    with pytest.raises(Busy, match=f"{folder} is in use by another process \\(pid {holder.pid}\\)"):
        RunLock(folder)
    holder.send_signal(signal.SIGKILL)  # a crash: nothing removes the lock file
    holder.wait()
    with RunLock(folder):
        with RunLock(folder):  # re-entrant within one process
            pass
    assert (folder / ".lock").is_file()


def test_a_second_train_on_a_run_directory_in_use_is_refused(tmp_path, lock_holder, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("the cat sat on the mat. " * 100, encoding="utf-8")
    run_dir = tmp_path / "run"
    holder = lock_holder(run_dir)
    args = [
        "train",
        "--data",
        str(corpus),
        "--tokenizer",
        "bytes",
        "--max-steps",
        "1",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--threads",
        "1",
        "--batch-size",
        "1",
        "--train-ctx",
        "64",
    ]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"bakallm train: error: {run_dir.resolve()} is in use by another process (pid {holder.pid}); wait for it to finish or stop it, then run the command again."
    )
    assert not (run_dir / "config.json").exists()  # nothing written


def test_a_train_that_fails_to_start_leaves_its_run_directory_free(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "bad.txt").write_bytes(b"\xff\xfe not text")
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(corpus),
                "--tokenizer",
                "bytes",
                "--run-dir",
                str(run_dir),
                "--no-progress",
                "--threads",
                "1",
            ]
        )
        == 2
    )
    capsys.readouterr()
    # Another process can take the lock at once: this one released it although it lives on.
    taken = subprocess.run(
        [sys.executable, "-c", "import sys; from bakallm.locks import RunLock; RunLock(sys.argv[1])", str(run_dir)],
        capture_output=True,
        text=True,
    )
    assert taken.returncode == 0, taken.stderr


WRITE_ROWS = textwrap.dedent("""
    import sys
    from bakallm.results.db import ResultRow, ResultsDB
    path, writer, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with ResultsDB(path) as db:
        for index in range(rows):
            db.add(ResultRow(model_kind="bakallm", model_name=f"{writer}-{index}", benchmark="b", split="test", n_ctx=1, tokens=1, loss=1.0, ppl=2.7))
""")


def test_eight_processes_adding_rows_to_one_database_lose_none(tmp_path):
    path = tmp_path / "results.sqlite3"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITE_ROWS, str(path), f"w{writer}", "40"], stderr=subprocess.PIPE, text=True
        )
        for writer in range(8)
    ]
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    import sqlite3

    names = [name for (name,) in sqlite3.connect(path).execute("SELECT model_name FROM results")]
    assert sorted(names) == sorted(f"w{writer}-{index}" for writer in range(8) for index in range(40))


def test_two_ablate_processes_sharing_a_study_run_each_variant_once(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index in range(3):
        (corpus / f"doc{index}.txt").write_text(
            f"story {index}: " + "the cat sat on the mat and ran away. " * 60, encoding="utf-8"
        )
    spec = {
        "study": "shared",
        "output": str(tmp_path / "runs"),
        "tokenizer": "bytes",
        "data": [str(corpus)],
        "train_tokens": 2 * 64 * 2,
        "seed": 0,
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "window": 32, "n_memory": 2, "n_pauses": 2},
        "training": {"batch_size": 2, "train_ctx": 64, "lr": 0.001, "warmup_steps": 0, "save_every": 2},
        "eval": {"corpora": [{"name": "held-out", "data": str(corpus), "max_characters": 300}], "contexts": ["whole"]},
        "variants": [
            {"name": "first", "preset": "tiny"},
            {"name": "second", "preset": "tiny", "training": {"init_from": "first"}},
            {"name": "third", "preset": "tiny", "model": {"d_ff": 48}},
        ],
    }
    study = tmp_path / "shared.yaml"
    study.write_text(yaml.safe_dump(spec))
    db = tmp_path / "results.sqlite3"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "bakallm", "ablate", str(study), "--db", str(db), "--no-progress"]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, out + err
    import sqlite3

    names = [name for (name,) in sqlite3.connect(db).execute("SELECT model_name FROM results ORDER BY id")]
    assert sorted(names) == ["shared/first", "shared/second", "shared/third"]
    for variant in ("first", "second", "third"):
        assert json.loads((tmp_path / "runs" / variant / DONE_FILE).read_text())["rows"] == 1
    # Each variant was trained by one process only.
    assert sum(out.count(": training in ") for out, _ in outputs) == 3
