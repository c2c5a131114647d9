"""One live status line on the console, shared by the long-running commands.

Rewritten in place on a terminal (``\\r``), printed every ``log_every`` seconds otherwise
(job logs under ``ray job submit`` are not terminals), nothing with ``mode="none"``. What the
line says is the subclass's :meth:`StatusLine.line`.
"""

from __future__ import annotations

import sys
import time
from typing import Literal, TextIO

Mode = Literal["auto", "line", "log", "none"]


def hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate_text(per_second: float) -> str:
    """``1,204`` / ``9.3`` / ``0.07``: whole numbers where they say enough, else 2 digits
    (a big encoder on a CPU makes well under one tile per second)."""
    if per_second >= 10:
        return f"{per_second:,.0f}"
    return f"{per_second:.2g}" if per_second > 0 else "0"


class StatusLine:
    """Draws :meth:`line` at most every 0.2 s on a terminal, every ``log_every`` s else."""

    def __init__(self, *, mode: Mode = "auto", stream: TextIO | None = None,
                 log_every: float = 10.0):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "line" if self.stream.isatty() else "log"
        self.mode = mode
        self.start = time.monotonic()
        self.log_every = log_every
        self._last_draw = 0.0
        self._width = 0

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self) -> str:
        raise NotImplementedError

    def draw(self, *, force: bool = False) -> None:
        if self.mode == "none":
            return
        now = time.monotonic()
        every = 0.2 if self.mode == "line" else self.log_every
        if not force and now - self._last_draw < every:
            return
        self._last_draw = now
        text = self.line()
        if self.mode == "line":
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.draw(force=True)
        if self.mode == "line":
            self.stream.write("\n")
            self.stream.flush()


__all__ = ["Mode", "StatusLine", "hms", "rate_text"]
