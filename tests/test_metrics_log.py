import sqlite3
import sys
import types

import numpy as np
import pytest

from bakallm.errors import UserError
from bakallm.training.metrics import MetricsLog


def log_steps(log: MetricsLog, steps) -> None:
    for step in steps:
        log.log_step(
            step,
            epoch=step // 3,
            tokens=1000 * step,
            loss=10.0 / step,
            lr=1e-3,
            grad_norm=0.5 * step,
            tokens_per_s=2000.0,
            time=1.5 * step,
            padding=0.25,
        )


def test_steps_and_evals_round_trip(tmp_path):
    run_dir = tmp_path / "run"
    with MetricsLog(run_dir) as log:
        log_steps(log, [1, 2])
        log.log_step(np.int64(3), 1, np.int64(3000), np.float32(0.25), 5e-4, None, None, 4.5)
        log.log_eval(2, 2000, 4.0, 54.6, 1.2, "wikitext-103/validation")
        log.log_eval(2, 2000, 4.5, 90.0, None, "pg19/validation")
    assert (run_dir / "metrics.sqlite3").is_file()
    with MetricsLog(run_dir) as log:
        assert log.read_steps() == [
            {
                "step": 1,
                "epoch": 0,
                "tokens": 1000,
                "loss": 10.0,
                "lr": 1e-3,
                "grad_norm": 0.5,
                "tokens_per_s": 2000.0,
                "time": 1.5,
                "padding": 0.25,
            },
            {
                "step": 2,
                "epoch": 0,
                "tokens": 2000,
                "loss": 5.0,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_s": 2000.0,
                "time": 3.0,
                "padding": 0.25,
            },
            {
                "step": 3,
                "epoch": 1,
                "tokens": 3000,
                "loss": 0.25,
                "lr": 5e-4,
                "grad_norm": None,
                "tokens_per_s": None,
                "time": 4.5,
                "padding": None,
            },
        ]
        assert log.read_evals() == [
            {"step": 2, "tokens": 2000, "loss": 4.0, "ppl": 54.6, "bpb": 1.2, "data": "wikitext-103/validation"},
            {"step": 2, "tokens": 2000, "loss": 4.5, "ppl": 90.0, "bpb": None, "data": "pg19/validation"},
        ]


def test_every_write_is_committed_at_once(tmp_path):
    log = MetricsLog(tmp_path)
    log_steps(log, [1, 2])
    log.log_eval(2, 2000, 4.0, 54.6, 1.2, "val")
    # A second connection sees the rows while the log is still open: a killed trainer would keep them.
    reader = sqlite3.connect(tmp_path / "metrics.sqlite3")
    assert reader.execute("SELECT step, loss FROM steps ORDER BY step").fetchall() == [(1, 10.0), (2, 5.0)]
    assert reader.execute("SELECT count(*) FROM evals").fetchone() == (1,)
    reader.close()
    log.close()


def test_resume_truncates_then_replaces_steps(tmp_path):
    with MetricsLog(tmp_path) as log:
        log_steps(log, range(1, 7))
        log.log_eval(3, 3000, 4.0, 54.6, 1.2, "val")
        log.log_eval(6, 6000, 3.0, 20.1, 0.9, "val")
    # The last checkpoint was at step 4: the resumed run logs 5 and 6 again, with other values.
    with MetricsLog(tmp_path) as log:
        log.truncate_after(4)
        assert [row["step"] for row in log.read_steps()] == [1, 2, 3, 4]
        assert [row["step"] for row in log.read_evals()] == [3]
        log.log_step(4, 1, 4000, 9.0, 1e-3, 1.0, 2000.0, 6.0)  # logging a kept step again replaces it
        log.log_step(5, 1, 5000, 1.5, 1e-3, 1.0, 2000.0, 7.0)
        steps = log.read_steps()
    assert [(row["step"], row["loss"]) for row in steps] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3), (4, 9.0), (5, 1.5)]


def test_missing_mirror_packages_are_user_errors(tmp_path, monkeypatch):
    # None in sys.modules makes `import` fail, as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "tb", tensorboard=True)
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLog(tmp_path / "wb", wandb_project="bakallm")
    assert not (tmp_path / "tb").exists() and not (tmp_path / "wb").exists()


class FakeSummaryWriter:
    instances: list["FakeSummaryWriter"] = []

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.closed = log_dir, purge_step, [], False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, name, value, global_step):
        self.scalars.append((name, value, global_step))

    def close(self):
        self.closed = True


def test_tensorboard_mirror_records_and_purges_on_resume(tmp_path, monkeypatch):
    FakeSummaryWriter.instances = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeSummaryWriter))
    with MetricsLog(tmp_path, tensorboard=True) as log:
        log.log_step(1, 0, 1000, 2.5, 1e-3, None, 100.0, 1.0)
        log.log_eval(1, 1000, 3.0, 20.0, None, "val")
        log.truncate_after(0)
    first, after_resume = FakeSummaryWriter.instances
    assert first.log_dir == str(tmp_path / "tensorboard") and first.purge_step is None
    assert first.scalars == [
        ("train/loss", 2.5, 1),
        ("train/lr", 1e-3, 1),
        ("train/tokens_per_s", 100.0, 1),
        ("train/tokens", 1000, 1),
        ("train/epoch", 0, 1),
        ("eval/val/loss", 3.0, 1),
        ("eval/val/ppl", 20.0, 1),
    ]
    assert first.closed and after_resume.closed and after_resume.purge_step == 1


def test_wandb_mirror_keeps_one_run_id_across_resumes(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, scalars, step):
            calls.append(("log", scalars, step))

        def finish(self):
            calls.append(("finish",))

    def init(**settings):
        calls.append(("init", settings))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run_dir = tmp_path / "run7"
    with MetricsLog(run_dir, wandb_project="bakallm") as log:
        log.log_eval(5, 500, 3.0, 20.0, 1.0, "val")
    with MetricsLog(run_dir, wandb_project="bakallm"):
        pass
    first_init, log_call, first_finish, second_init, _ = calls
    assert (
        first_init[1]["project"] == "bakallm" and first_init[1]["name"] == "run7" and first_init[1]["resume"] == "allow"
    )
    assert second_init[1]["id"] == first_init[1]["id"]
    assert log_call == ("log", {"eval/val/loss": 3.0, "eval/val/ppl": 20.0, "eval/val/bpb": 1.0}, 5)
    assert first_finish == ("finish",)


def test_a_log_from_before_the_padding_column_gains_it(tmp_path):
    import sqlite3

    run_dir = tmp_path / "old"
    run_dir.mkdir()
    with sqlite3.connect(run_dir / "metrics.sqlite3") as connection:
        connection.execute(
            "CREATE TABLE steps (step INTEGER PRIMARY KEY, epoch INTEGER, tokens INTEGER, loss REAL, lr REAL, grad_norm REAL, tokens_per_s REAL, time REAL)"
        )
        connection.execute("INSERT INTO steps VALUES (1, 0, 10, 2.0, 0.1, 1.0, 5.0, 1.0)")
    with MetricsLog(run_dir) as log:
        log.log_step(2, 0, 20, 1.5, 0.1, 1.0, 5.0, 2.0, padding=0.5)
        assert [row["padding"] for row in log.read_steps()] == [None, 0.5]
