"""Live console progress of the embedding job and its closing summary.

One line, rewritten in place on a terminal (``\\r``) and printed every ``log_every`` seconds
otherwise (job logs under ``ray job submit`` are not terminals)::

    slides 12/40 (skipped 3, failed 1) | tiles 18,432 @ 1,204/s | ETA 0:01:10
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TextIO

from care_scale.console import Mode, StatusLine, hms, rate_text


@dataclass
class RunSummary:
    """What one run did; returned by ``run_embedding`` and printed at the end."""

    run_id: str
    warehouse: str
    model_version: str
    backend: str
    total: int = 0  # slides listed in the source
    skipped: int = 0  # already complete for this model version
    done: int = 0  # embedded and committed in this run
    failed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (slide_id, type, msg)
    untrained: list[str] = field(default_factory=list)  # models that ran on seeded weights
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (uri, why): not inputs
    precision_note: str = ""  # what `precision: auto` chose, and why

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [
            (f"run {self.run_id}: {self.done} slide(s) embedded, {self.skipped} already done, "
             f"{self.failed} failed, of {self.total} listed"),
            (f"  {self.tiles:,} tiles in {self.seconds:.1f} s "
             f"({rate_text(self.tiles_per_second)} tiles/s), backend {self.backend}"),
            f"  model version {self.model_version}",
            f"  warehouse {self.warehouse}",
        ]
        if self.precision_note:
            lines.append(f"  precision auto -> {self.precision_note}")
        if self.untrained:
            lines.append(f"  UNTRAINED weights: {', '.join(self.untrained)} (seeded random "
                         "weights; these embeddings carry no biological meaning)")
        if self.ignored:
            lines.append(f"  {len(self.ignored)} file(s) in the source not embedded:")
            lines += [f"    {uri}: {why}" for uri, why in self.ignored[:10]]
            if len(self.ignored) > 10:
                lines.append(f"    ... and {len(self.ignored) - 10} more")
        for sid, etype, msg in self.failures[:20]:
            lines.append(f"  FAILED {sid}: {etype}: {msg}")
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (see the failures table)")
        return "\n".join(lines)


class Progress(StatusLine):
    """Counts slides and tiles as the driver sees them; draws the status line."""

    def __init__(
        self,
        total: int,
        *,
        skipped: int = 0,
        mode: Mode = "auto",
        stream: TextIO | None = None,
        log_every: float = 10.0,
    ):
        super().__init__(mode=mode, stream=stream, log_every=log_every)
        self.total = total
        self.skipped = skipped
        self.done = 0
        self.failed = 0
        self.tiles = 0

    def add_tiles(self, n: int) -> None:
        self.tiles += n
        self.draw()

    def slide_done(self) -> None:
        self.done += 1
        self.draw()

    def slide_failed(self) -> None:
        self.failed += 1
        self.draw()

    def line(self) -> str:
        todo = self.total - self.skipped
        finished = self.done + self.failed
        elapsed = self.elapsed
        rate = self.tiles / elapsed if elapsed > 0 else 0.0
        if finished and todo > finished:
            eta = hms(elapsed / finished * (todo - finished))
        else:
            eta = "-:--:--" if todo > finished else hms(0)
        return (
            f"slides {finished}/{todo} (skipped {self.skipped}, failed {self.failed}) | "
            f"tiles {self.tiles:,} @ {rate_text(rate)}/s | ETA {eta}"
        )
