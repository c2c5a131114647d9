"""Ray clusters that care-scale starts on this machine listen on 127.0.0.1 only.

Left to itself, ``ray.init(address="local")`` binds its GCS, raylet, worker and agent servers
to every interface and to the machine's routable address. Ray chooses the address when the
``ray`` package is *imported*: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` it uses loopback
for everything, as it does on macOS and Windows. So the variable must be set before the first
``import ray`` of the process, and only for clusters of our own: a driver joining a real
multi-node cluster (``RAY_ADDRESS``) must keep its routable address.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_only() -> bool:
    """Make the Ray of this process (and every process it starts) bind loopback only.

    False when it is too late: ``ray`` was imported before without the setting.
    """
    if os.environ.get(LOOPBACK_ENV) == "0":
        return True
    if "ray" in sys.modules:
        return False
    os.environ[LOOPBACK_ENV] = "0"
    return True


def init_local(**kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)``: a fresh single-node cluster on loopback."""
    if not loopback_only():
        log.warning("ray was imported before care-scale started its local cluster, so Ray's "
                    "servers may listen beyond 127.0.0.1; set %s=0 before importing ray",
                    LOOPBACK_ENV)
    import ray

    quiet_console()
    ray.init(address="local", **kwargs)


#: Ray's loggers whose console handler care-scale raises, and to what level.
_QUIET = {"ray": logging.WARNING, "ray.data": logging.ERROR}
#: The local cluster's "token authentication is enabled" notice (it is, and stays so).
_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"


def quiet_console() -> None:
    """Ray's own console lines (cluster started, Ray Data's plans and progress-bar notices,
    its false "no available CPUs" alarm while our actors hold them) off stderr: care-scale's
    jobs print their own progress line and summary. Ray's log files keep them
    (/tmp/ray/session_latest/logs). Call after ``import ray`` / ``import ray.data``, which
    install those handlers; idempotent."""
    for name, level in _QUIET.items():
        for handler in logging.getLogger(name).handlers:
            # The console (Ray's PlainRayHandler), not Ray's log files (FileHandler / its own).
            if (isinstance(handler, logging.StreamHandler)
                    and not isinstance(handler, logging.FileHandler)):
                handler.setLevel(level)
    logging.getLogger(_AUTH_NOTICE).setLevel(logging.ERROR)


__all__ = ["LOOPBACK_ENV", "init_local", "loopback_only", "quiet_console"]
