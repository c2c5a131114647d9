"""Threads that use the node: the encoder actor's intra-op threads and a decode task's tile
reader pool, sized from the CPUs Ray gave that worker.

Ray reserves CPUs per worker (``concurrency.num_cpus_per_actor``, ``decode_num_cpus``) but
does not pin them, so a worker's thread pools must follow its reservation: an encoder actor
given 2 CPUs that runs 1 intra-op thread leaves a core idle (the 2-core measurement in issue
20: 38 tiles/s with 1 thread, 73-77 with 2), one given 1 CPU that runs one thread per core
of the machine oversubscribes the cores the decode tasks hold. The explicit settings
(``concurrency.torch_threads``, ``concurrency.decode_num_workers``) still win.

Where the job knows its actors' placement (one node: a local cluster, or a one-node cluster
it was submitted to), an encoder actor runs its share of the node's cores instead: the cores
divided by the encoder actors on it. The decode tasks' and the CARE actor's reservations
(0.5 CPU each by default) are what Ray needs to schedule them, not what they use while the
encoder is the bottleneck, and with ONNX Runtime's spinning off a busy decode thread simply
takes its turn. Measured on a 2-core AVX-512 machine (issue 20): encoding ViT-Ti tiles at
48 -> 59 tiles/s (fp32) and 62 -> 82 (int8) with 2 threads instead of 1; 8 slides through the
micro encoder 14.8-19.5 s -> 12.3 s end to end.
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


def intra_op_threads(setting: int | None, assigned: float | None, *,
                     actors_on_node: int | None = None) -> int:
    """An encoder's intra-op threads: the explicit setting; else, with ``actors_on_node``
    known, its share of the cores present (at least its assigned CPUs); else one per CPU Ray
    assigned (a fraction counts as one), never more than the cores present; 1 when none
    assigned."""
    if setting is not None:
        return max(1, int(setting))
    from care_scale.inference.precision import usable_cores

    cores = usable_cores()
    own = min(math.ceil(assigned - 1e-9), cores) if assigned else 1
    if actors_on_node:
        return max(1, own, cores // max(1, int(actors_on_node)))
    return max(1, own)


def decode_threads(setting: int | None, assigned: float | None) -> int:
    """A decode task's tile-reader threads: the explicit setting, else one per CPU Ray
    assigned, at least :data:`MIN_DECODE_THREADS`."""
    if setting is not None:
        return max(1, int(setting))
    return max(MIN_DECODE_THREADS, math.ceil((assigned or 0.0) - 1e-9))


__all__ = ["MIN_DECODE_THREADS", "assigned_cpus", "decode_threads", "intra_op_threads"]
