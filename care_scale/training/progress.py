"""A live status line for a training run, read from the metrics rank 0 writes.

The driver only waits in ``trainer.fit()``; the workers write ``metrics.jsonl`` into the run
folder every ``run.log_every`` steps (local or object storage). A watcher thread reads it
every few seconds and draws ``stage1 step 40/200 | loss 0.5321 | 1.90 s/step | ETA 0:05:04``
(:class:`care_scale.console.StatusLine`: in place on a terminal, a line every 10 s else), so a
run that takes minutes shows that it is running and how fast.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from care_scale.console import Mode, StatusLine, hms

#: Seconds between reads of the metrics file.
POLL_SECONDS = 2.0


class TrainingProgress(StatusLine):
    def __init__(self, stage: str, steps: int, *, mode: Mode = "auto", **kwargs: Any):
        super().__init__(mode=mode, **kwargs)
        self.stage, self.steps = stage, int(steps)
        self.last: dict[str, Any] | None = None

    def update(self, history: list[dict[str, Any]]) -> None:
        if history:
            self.last = history[-1]
        self.draw()

    def line(self) -> str:
        if self.last is None:
            return f"{self.stage} starting the workers ({hms(self.elapsed)})"
        step = int(self.last.get("step", 0))
        parts = [f"{self.stage} step {step}/{self.steps}"]
        if "loss" in self.last:
            parts.append(f"loss {float(self.last['loss']):.4f}")
        # Wall time per step so far, start-up included: what the ETA should extrapolate.
        rate = self.elapsed / step if step else 0.0
        parts.append(f"{rate:.2f} s/step")
        eta = hms(rate * (self.steps - step)) if step else "-:--:--"
        parts.append(f"ETA {eta}")
        return " | ".join(parts)


@contextlib.contextmanager
def watch(stage: str, run_uri: str, steps: int, storage_options: dict[str, Any] | None,
          *, mode: Mode = "auto") -> Iterator[TrainingProgress]:
    """Draw the run's progress while the body runs (``trainer.fit()``); stops with it."""
    from care_scale.training.loop import read_metrics

    progress = TrainingProgress(stage, steps, mode=mode)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(POLL_SECONDS):
            try:
                progress.update(read_metrics(run_uri, storage_options))
            except (OSError, ValueError):
                progress.draw()  # a file being rewritten, a store hiccup: try again later

    thread = threading.Thread(target=poll, name="training-progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join(timeout=POLL_SECONDS * 2)
        try:
            progress.update(read_metrics(run_uri, storage_options))
        except (OSError, ValueError):
            pass
        progress.close()


__all__ = ["POLL_SECONDS", "TrainingProgress", "watch"]
