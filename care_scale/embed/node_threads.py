"""Threads that use the node: the encoder actor's intra-op threads and a decode task's tile
reader pool, sized from the CPUs Ray gave that worker.

Ray reserves CPUs per worker (``concurrency.num_cpus_per_actor``, ``decode_num_cpus``) but
does not pin them, so a worker's thread pools must follow its reservation: an encoder actor
given 2 CPUs that runs 1 intra-op thread leaves a core idle (the 2-core measurement in issue
20: 38 tiles/s with 1 thread, 73-77 with 2), one given 1 CPU that runs one thread per core
of the machine oversubscribes the cores the decode tasks hold. The explicit settings
(``concurrency.torch_threads``, ``concurrency.decode_num_workers``) still win.
"""

from __future__ import annotations

import math

#: A decode task's reader pool never goes below this (the fixed default before sizing):
#: its threads wait on the slide's reads part of the time, so a fractional CPU still
#: keeps two of them busy.
MIN_DECODE_THREADS = 2


def assigned_cpus() -> float | None:
    """The CPUs Ray assigned to the current worker (actor or task); None outside Ray or
    when it reserved none."""
    import sys

    ray = sys.modules.get("ray")  # a worker has imported ray; a plain process need not
    if ray is None or not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return float(cpus) if cpus else None


def intra_op_threads(setting: int | None, assigned: float | None) -> int:
    """An encoder's intra-op threads: the explicit setting, else one per CPU Ray assigned
    (a fraction counts as one), never more than the cores present; 1 when none assigned."""
    if setting is not None:
        return max(1, int(setting))
    if not assigned:
        return 1
    from care_scale.inference.precision import usable_cores

    return max(1, min(math.ceil(assigned - 1e-9), usable_cores()))


def decode_threads(setting: int | None, assigned: float | None) -> int:
    """A decode task's tile-reader threads: the explicit setting, else one per CPU Ray
    assigned, at least :data:`MIN_DECODE_THREADS`."""
    if setting is not None:
        return max(1, int(setting))
    return max(MIN_DECODE_THREADS, math.ceil((assigned or 0.0) - 1e-9))


__all__ = ["MIN_DECODE_THREADS", "assigned_cpus", "decode_threads", "intra_op_threads"]
