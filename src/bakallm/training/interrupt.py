"""Ctrl-C and SIGTERM during training: the first stops the run cleanly, the second at once.

Inside `GracefulInterrupt`, the first SIGINT or SIGTERM only sets `requested`: the loop finishes
its step, writes a checkpoint and stops. A second signal ends the process immediately with status
130; a checkpoint being written then stays an unfinished temporary folder, and the last complete
checkpoint is untouched (checkpoints are renamed into place only once complete).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

INTERRUPTED_EXIT_STATUS = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulInterrupt:
    def __init__(self, message: str):
        self.message = message  # printed when the first signal arrives
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: object) -> None:
        if self.requested:
            print(
                f"\nbakallm: second {signal.Signals(number).name}, stopping now; the last complete checkpoint is kept.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(INTERRUPTED_EXIT_STATUS)
        self.requested = True
        print(
            f"\nbakallm: {signal.Signals(number).name} received; {self.message} (send it again to stop at once).",
            file=sys.stderr,
            flush=True,
        )
