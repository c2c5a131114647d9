"""``care-scale bench``: measure one node (decode, patch encoder per backend and precision, CARE
at N patches, the hardware seen) and plan a cohort on a cluster from those rates.

    from care_scale.bench import BenchConfig, run_bench, plan_cohort, ClusterShape
    result = run_bench(BenchConfig(seconds=20))          # JSON-ready dict
    plan = plan_cohort(rates_from_bench(result), ClusterShape(...), slides=50_000,
                       tiles_per_slide=12_000)

Modules: ``hardware`` (what machine), ``measure`` (the timed parts), ``budget`` (how
``--seconds`` bounds the whole run: stage clocks, build estimates, skips), ``plan`` (pure
arithmetic from rates to wall time, GPU-hours and the bottleneck), ``report`` (text tables).
Importing this package loads no model and no heavy library.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "BenchConfig": "care_scale.bench.measure",
    "run_bench": "care_scale.bench.measure",
    "ClusterShape": "care_scale.bench.plan",
    "Rates": "care_scale.bench.plan",
    "plan_cohort": "care_scale.bench.plan",
    "rates_from_bench": "care_scale.bench.plan",
    "format_bench": "care_scale.bench.report",
    "format_plan": "care_scale.bench.report",
    "hardware": "care_scale.bench.hardware",
}

__all__ = ["BenchConfig", "ClusterShape", "Rates", "format_bench", "format_plan", "hardware",
           "plan_cohort", "rates_from_bench", "run_bench"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'care_scale.bench' has no attribute {name!r}")
