"""When each phase of one embedding run ended (wall clock), for the fixed-cost breakdown.

The driver marks its phases (``mark("listed")``); the encoder actors report when they were
ready and when they encoded their first and last tiles (``PatchEncoder.info``). The run
records all of it in ``runs.counts_json`` under ``timeline`` (epoch seconds), which
``benchmarks/bench_fixed_cost.py`` reads beside its own start and exit times. Marks cost a
dictionary write each, and nothing here grows with tiles.

:class:`TileCounter` is the one record that follows the tiles: each encoder actor keeps how many
tiles it had encoded by when (bounded: ``MAX_SAMPLES`` evenly thinned samples however long the
run), and :func:`merge_counts` sums the actors' records into the run's ``tiles_over_time``
(``runs.counts_json``), which ``care-scale report`` plots as tiles/s over the run.
"""

from __future__ import annotations

import time

_MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    """Record that phase ``name`` ended now (the first time it is marked, per process)."""
    _MARKS.setdefault(name, time.time())


def reset(keep: tuple[str, ...] = ()) -> None:
    """Forget the marks of an earlier run in this process, except those named in ``keep``."""
    for name in [n for n in _MARKS if n not in keep]:
        del _MARKS[name]


def marks() -> dict[str, float]:
    """The marks so far, in the order they were made."""
    return dict(_MARKS)


#: At most this many (time, tiles) samples per record: one per ``SAMPLE_EVERY`` seconds; when
#: full, every other one is dropped and the spacing doubles, so a run of days keeps an evenly
#: spaced record of bounded size.
MAX_SAMPLES = 512
SAMPLE_EVERY = 1.0  # s


def _thin(samples: list[list[float]]) -> list[list[float]]:
    """Every other sample, the last one kept."""
    return samples[:-1:2] + samples[-1:]


class TileCounter:
    """Cumulative tiles over time, ``samples = [[epoch seconds, tiles so far], ...]``,
    starting at ``[created, 0]``."""

    def __init__(self) -> None:
        self.tiles = 0
        now = round(time.time(), 2)
        self.samples: list[list[float]] = [[now, 0]]
        self._every = SAMPLE_EVERY
        self._next = now  # when the next sample is appended rather than the newest updated

    def add(self, n: int) -> None:
        self.tiles += n
        now = round(time.time(), 2)
        if now >= self._next:
            self.samples.append([now, self.tiles])
            self._next = now + self._every
            if len(self.samples) >= MAX_SAMPLES:
                self.samples = _thin(self.samples)
                self._every *= 2
        else:  # within the spacing: the newest sample moves up, so the record ends at the count
            self.samples[-1] = [now, self.tiles]


def merge_counts(records: list[list[list[float]]]) -> list[list[float]]:
    """The sum of several :class:`TileCounter` records (one per encoder actor) as one record
    of the same form, at the union of their sample times (linear between samples, 0 before a
    record starts, its last count after it ends), thinned to ``MAX_SAMPLES``."""
    import numpy as np

    records = [r for r in records if r]
    if not records:
        return []
    times = np.unique(np.concatenate([np.asarray(r, float)[:, 0] for r in records]))
    total = np.zeros_like(times)
    for r in records:
        t, n = np.asarray(r, float).T
        total += np.interp(times, t, n, left=0.0, right=n[-1])
    out = [[round(float(t), 2), int(np.rint(c))] for t, c in zip(times, total)]
    while len(out) > MAX_SAMPLES:
        out = _thin(out)
    return out


__all__ = ["MAX_SAMPLES", "TileCounter", "mark", "marks", "merge_counts", "reset"]
