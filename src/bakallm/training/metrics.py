"""The per-step metrics log a training run keeps in its run directory, optionally mirrored to TensorBoard or W&B."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path
from typing import Any, Protocol

from bakallm.errors import UserError

METRICS_FILE_NAME = "metrics.sqlite3"

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS steps (
        step INTEGER PRIMARY KEY,
        epoch INTEGER,
        tokens INTEGER,        -- cumulative tokens seen
        loss REAL,
        lr REAL,
        grad_norm REAL,
        tokens_per_s REAL,
        time REAL,             -- wall seconds since the run started
        padding REAL           -- share of the step's positions without a target
    )
    """,
    "CREATE TABLE IF NOT EXISTS evals (step INTEGER, tokens INTEGER, loss REAL, ppl REAL, bpb REAL, data TEXT)",
    "CREATE INDEX IF NOT EXISTS evals_by_step ON evals (step)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
STEP_COLUMNS = ("step", "epoch", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "time", "padding")
EVAL_COLUMNS = ("step", "tokens", "loss", "ppl", "bpb", "data")
WANDB_RUN_ID_KEY = "wandb_run_id"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE_NAME


class _Mirror(Protocol):
    def record(self, step: int, scalars: dict[str, float]) -> None: ...
    def rewind(self, step: int) -> None: ...
    def close(self) -> None: ...


class MetricsLog:
    """Appends training steps and evaluations to `run_dir/metrics.sqlite3`, each committed as it is written.

    Every write is its own transaction, so a killed trainer loses nothing it has logged; on resume,
    `truncate_after(checkpoint_step)` drops the steps the checkpoint does not contain.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, wandb_project: str | None = None):
        self.run_dir = Path(run_dir)
        # Look for the optional packages before touching the disk, so a missing one leaves nothing behind.
        summary_writer_class = _import_summary_writer() if tensorboard else None
        wandb_module = _import_wandb() if wandb_project is not None else None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._connection = sqlite3.connect(metrics_path(self.run_dir), timeout=30.0, isolation_level=None)
        self._connection.row_factory = sqlite3.Row
        # WAL lets `bakallm plot` read the log while the trainer writes it; NORMAL sync is safe against
        # a killed process (only a power cut can lose the newest commits) and keeps per-step commits cheap.
        self._connection.execute("PRAGMA journal_mode = WAL")
        self._connection.execute("PRAGMA synchronous = NORMAL")
        for statement in _SCHEMA:
            self._connection.execute(statement)
        if "padding" not in {record["name"] for record in self._connection.execute("PRAGMA table_info(steps)")}:
            self._connection.execute(
                "ALTER TABLE steps ADD COLUMN padding REAL"
            )  # a log written before the column existed
        self._mirrors: list[_Mirror] = []
        if summary_writer_class is not None:
            self._mirrors.append(_TensorBoardMirror(summary_writer_class, self.run_dir / "tensorboard"))
        if wandb_module is not None:
            self._mirrors.append(_WandbMirror(wandb_module, wandb_project, self.run_dir, self._wandb_run_id()))

    def log_step(
        self,
        step: int,
        epoch: int,
        tokens: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        tokens_per_s: float | None,
        time: float,
        padding: float | None = None,
    ) -> None:
        """Record one optimiser step; logging a step again (after a resume) replaces the earlier row."""
        # Plain Python numbers: SQLite cannot store numpy or torch scalars.
        values = {
            "step": int(step),
            "epoch": int(epoch),
            "tokens": int(tokens),
            "loss": float(loss),
            "lr": float(lr),
            "grad_norm": _optional_float(grad_norm),
            "tokens_per_s": _optional_float(tokens_per_s),
            "time": float(time),
            "padding": _optional_float(padding),
        }
        self._connection.execute(
            f"INSERT OR REPLACE INTO steps ({', '.join(STEP_COLUMNS)}) VALUES ({', '.join(':' + name for name in STEP_COLUMNS)})",
            values,
        )
        scalars = {
            f"train/{name}": values[name]
            for name in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens", "epoch", "padding")
        }
        self._mirror(values["step"], scalars)

    def log_eval(self, step: int, tokens: int, loss: float, ppl: float, bpb: float | None, data: str) -> None:
        """Record one evaluation of the model at `step` on the data set named `data`."""
        values = {
            "step": int(step),
            "tokens": int(tokens),
            "loss": float(loss),
            "ppl": float(ppl),
            "bpb": _optional_float(bpb),
            "data": str(data),
        }
        self._connection.execute(
            f"INSERT INTO evals ({', '.join(EVAL_COLUMNS)}) VALUES ({', '.join(':' + name for name in EVAL_COLUMNS)})",
            values,
        )
        self._mirror(values["step"], {f"eval/{data}/{name}": values[name] for name in ("loss", "ppl", "bpb")})

    def read_steps(self) -> list[dict[str, Any]]:
        """Every logged step in step order, as dicts keyed by the `steps` columns (NaN losses read back as None)."""
        return self._read(f"SELECT {', '.join(STEP_COLUMNS)} FROM steps ORDER BY step")

    def read_evals(self) -> list[dict[str, Any]]:
        """Every evaluation in step order, then in the order they were logged."""
        return self._read(f"SELECT {', '.join(EVAL_COLUMNS)} FROM evals ORDER BY step, rowid")

    def truncate_after(self, step: int) -> None:
        """Forget steps and evaluations after `step`: the resumed run is about to log them again."""
        with self._connection:  # commits both deletions, or neither
            self._connection.execute("BEGIN")
            self._connection.execute("DELETE FROM steps WHERE step > ?", (int(step),))
            self._connection.execute("DELETE FROM evals WHERE step > ?", (int(step),))
        for mirror in self._mirrors:
            mirror.rewind(int(step))

    def close(self) -> None:
        for mirror in self._mirrors:
            mirror.close()
        self._mirrors = []
        self._connection.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _read(self, query: str) -> list[dict[str, Any]]:
        return [dict(record) for record in self._connection.execute(query)]

    def _mirror(self, step: int, scalars: dict[str, float | int | None]) -> None:
        present = {name: value for name, value in scalars.items() if value is not None}
        for mirror in self._mirrors:
            mirror.record(step, present)

    def _wandb_run_id(self) -> str:
        """The W&B run id of this run directory, kept in the log so a resumed run continues the same W&B run."""
        record = self._connection.execute("SELECT value FROM meta WHERE key = ?", (WANDB_RUN_ID_KEY,)).fetchone()
        if record is not None:
            return record["value"]
        run_id = secrets.token_hex(8)
        self._connection.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (WANDB_RUN_ID_KEY, run_id))
        return run_id


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _import_summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "TensorBoard logging needs the tensorboard package: run `pip install tensorboard`, or drop the TensorBoard option."
        ) from None
    return SummaryWriter


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise UserError(
            "Weights & Biases logging needs the wandb package: run `pip install wandb`, or drop the W&B project option."
        ) from None
    return wandb


class _TensorBoardMirror:
    def __init__(self, summary_writer_class: type, log_dir: Path):
        self._summary_writer_class = summary_writer_class
        self._log_dir = log_dir
        self._writer = summary_writer_class(log_dir=str(log_dir))

    def record(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)

    def rewind(self, step: int) -> None:
        # TensorBoard hides events at or after purge_step written by the earlier run, so its curves match the log.
        self._writer.close()
        self._writer = self._summary_writer_class(log_dir=str(self._log_dir), purge_step=step + 1)

    def close(self) -> None:
        self._writer.close()


class _WandbMirror:
    def __init__(self, wandb: Any, project: str, run_dir: Path, run_id: str):
        self._run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), id=run_id, resume="allow")

    def record(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def rewind(self, step: int) -> None:
        # W&B cannot delete logged steps: after a resume it ignores, with a warning, steps it has already seen.
        pass

    def close(self) -> None:
        self._run.finish()
