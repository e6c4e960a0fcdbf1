"""Atomic file writes: a reader, or a process killed mid-write, never sees a half-written file.

A write that fails for want of space (a full disk, a quota, a file-size limit) becomes one
sentence naming the file, with the temporary file removed and the previous file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from bakallm.errors import UserError

# How each cause of "no room" reads, by errno and in the messages of libraries that do not raise
# OSError (safetensors' Rust writer, torch.save's zip writer, SQLite).
_NO_ROOM = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file-size limit (ulimit -f) was reached",
}
_NO_ROOM_MESSAGES = {
    "No space left on device": _NO_ROOM[errno.ENOSPC],
    "os error 28": _NO_ROOM[errno.ENOSPC],
    "database or disk is full": _NO_ROOM[errno.ENOSPC],
    "Disk quota exceeded": _NO_ROOM[errno.EDQUOT],
    "os error 122": _NO_ROOM[errno.EDQUOT],
    "File too large": _NO_ROOM[errno.EFBIG],
    "os error 27": _NO_ROOM[errno.EFBIG],
    # SQLite reports a write past a file-size limit (and a failing disk) only as this.
    "disk I/O error": "the disk refused the write (full, past a file-size limit, or failing)",
}


def no_room_reason(error: BaseException) -> str | None:
    """Why `error` (or an error it was raised from) failed for want of space, or None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_ROOM:
            return _NO_ROOM[seen.errno]
        for message, reason in _NO_ROOM_MESSAGES.items():
            if message in str(seen):
                return reason
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def reporting_no_room(describe: str, advice: str = "free some space and run the same command again") -> Iterator[None]:
    """Turns a failure for want of space inside the block into one sentence: 'Could not
    {describe}: {reason}; {advice}.' Other errors pass through unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        reason = no_room_reason(error)
        if reason is None:
            raise
        raise UserError(f"Could not {describe}: {reason}; {advice}.") from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    # mkstemp makes owner-only files; give the result the permissions a plain open() would, after
    # the writer is done: some (safetensors) replace the file with one of their own permissions.
    umask = os.umask(0)
    os.umask(umask)
    try:
        with reporting_no_room(
            f"write {path}", "free some space and run the same command again (the file as it was before is unchanged)"
        ):
            yield Path(temporary)
            os.chmod(temporary, 0o666 & ~umask)
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
