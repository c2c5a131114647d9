"""Ray options of the job's actor pools (patch encoders, slide encoders), made in one place."""

from __future__ import annotations

from typing import Any


def actor_options(*, num_cpus: float, num_gpus: float, resources: dict[str, float],
                  max_restarts: int, max_task_retries: int) -> dict[str, Any]:
    """``ray.remote(cls).options(**...)`` for one pool: its share of the node, custom
    resources that pin it to a node group, restarts, and the driver's Hugging Face cache
    variables (``hf:`` checkpoints resolve in the same place on every node)."""
    from care_scale.models.hub import cache_env  # (care_scale.models imports torch)

    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus,
                            "max_restarts": max_restarts, "max_task_retries": max_task_retries}
    if resources:
        opts["resources"] = dict(resources)
    if cache_env():
        opts["runtime_env"] = {"env_vars": cache_env()}
    return opts
