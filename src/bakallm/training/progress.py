"""What a training run shows while it works: a progress bar on a terminal, text lines elsewhere.

On a terminal (and without `--no-progress`) a tqdm bar shows the steps, epoch, smoothed loss,
tokens/s and padding. In a log file, or with `--no-progress`, one line is printed every
`--log-every` steps instead, which reads well in a file and in `grep`:

    step 120/457 | epoch 0.262 | loss 5.8123 | lr 9.80e-04 | 1,234 tok/s | padding 3.1% | ETA 0:12:34
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import TextIO


def format_duration(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ProgressReport:
    def __init__(
        self, total_steps: int, first_step: int, show_bar: bool, stream: TextIO | None = None, enabled: bool = True
    ):
        """`enabled=False` shows nothing (the ranks of a torchrun launch other than rank 0)."""
        from tqdm.auto import tqdm

        self.stream = stream or sys.stdout
        self.total_steps = total_steps
        self._first_step = first_step
        self._started = time.perf_counter()
        self.enabled = enabled
        self._bar = (
            tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)
            if show_bar and enabled
            else None
        )

    def step_done(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def eta_seconds(self, step: int) -> float:
        """Remaining steps at the mean pace of the steps taken since this process started."""
        taken = step - self._first_step
        if taken <= 0:
            return float("nan")
        return max(self.total_steps - step, 0) * (time.perf_counter() - self._started) / taken

    def log(self, step: int, epoch: float, loss: float, lr: float, tokens_per_s: float, padding: float) -> None:
        """The state of the run every --log-every steps: bar postfix, or one text line."""
        if self._bar is not None:
            self._bar.set_postfix(
                epoch=f"{epoch:.3f}", loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:.0f}", pad=f"{padding:.1%}"
            )
            return
        eta = self.eta_seconds(step)
        self.message(
            f"step {step}/{self.total_steps} | epoch {epoch:.3f} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
            f" | padding {padding:.1%} | ETA {format_duration(eta) if eta == eta else '?'}"
        )

    def epoch_done(self, epoch: int, steps: int, padding: float) -> None:
        self.message(f"epoch {epoch} done in {steps} steps | padding {padding:.1%}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
