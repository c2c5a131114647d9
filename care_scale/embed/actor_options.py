"""Ray options of the job's actor pools (patch encoders, slide encoders), made in one place."""

from __future__ import annotations

import os
from typing import Any

#: Where the Hugging Face cache (and transformers' copy of remote code) is
#: (``care_scale.models.hub``). The job gives its actors the driver's values, so ``hf:``
#: resolves in the same place on every node (a shared filesystem, or the same path
#: provisioned on each).
CACHE_ENV_VARS = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "HF_MODULES_CACHE")


def cache_env() -> dict[str, str]:
    """The driver's values of :data:`CACHE_ENV_VARS` that are set."""
    return {k: os.environ[k] for k in CACHE_ENV_VARS if os.environ.get(k)}


def actor_options(*, num_cpus: float, num_gpus: float, resources: dict[str, float],
                  max_restarts: int, max_task_retries: int) -> dict[str, Any]:
    """``ray.remote(cls).options(**...)`` for one pool: its share of the node, custom
    resources that pin it to a node group, restarts, and the driver's Hugging Face cache
    variables (:func:`cache_env`)."""
    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus,
                            "max_restarts": max_restarts, "max_task_retries": max_task_retries}
    if resources:
        opts["resources"] = dict(resources)
    if cache_env():
        opts["runtime_env"] = {"env_vars": cache_env()}
    return opts
