"""One process at a time per run directory: an exclusive lock that dies with its process.

`bakallm train` holds the lock of its run directory while it runs, so a second `train` (or a
second `ablate` process reaching the same variant) is refused in one sentence instead of writing
the same checkpoints. The lock is an advisory `flock` on RUN_DIR/.lock: the kernel drops it when
the process ends, however it ends, so a crashed run never leaves a lock that must be removed by
hand. Within one process the lock is re-entrant (the ablation runner holds a variant's lock and
the trainer it starts takes it again). Without `fcntl` (Windows) nothing is locked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bakallm.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".lock"


class Busy(UserError):
    """Another process holds the lock."""


@dataclass
class _Held:
    descriptor: int
    depth: int


_held: dict[Path, _Held] = {}


class RunLock:
    """The lock of one folder, held by this process until `release` (or the process's end)."""

    def __init__(self, folder: str | Path, wait: bool = False):
        """Takes the lock of `folder`; waits for it with `wait`, else raises Busy when another
        process holds it."""
        folder = Path(folder).resolve()
        self.path = folder / LOCK_FILE
        self.released = False
        if self.path in _held:
            _held[self.path].depth += 1
            return
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise Busy(
                    f"{folder} is in use by another process (pid {holder}); wait for it to finish or stop it, then run the command again."
                ) from None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        _held[self.path] = _Held(descriptor, 1)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        held = _held[self.path]
        held.depth -= 1
        if held.depth == 0:
            del _held[self.path]
            os.close(held.descriptor)  # closing the descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
