"""When each phase of one embedding run ended (wall clock), for the fixed-cost breakdown.

The driver marks its phases (``mark("listed")``); the encoder actors report when they were
ready and when they encoded their first and last tiles (``PatchEncoder.info``). The run
records all of it in ``runs.counts_json`` under ``timeline`` (epoch seconds), which
``benchmarks/bench_fixed_cost.py`` reads beside its own start and exit times. Marks cost a
dictionary write each, and nothing here grows with tiles.
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


__all__ = ["mark", "marks", "reset"]
