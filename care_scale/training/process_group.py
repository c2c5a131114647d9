"""torch.distributed for the training workers, with its store bound to one address.

Ray Train's own TorchConfig calls ``init_process_group("env://")``. Rank 0 then serves the
process group's TCPStore on every interface (``*:port``), whatever MASTER_ADDR says: on a
laptop or a shared CI box that is a port open to the network for the length of the run. This
backend does the same setup with the store's listening socket bound, by us, to rank 0's node
address only (``master_listen_fd``), which on a local cluster is 127.0.0.1; gloo's own
connections are kept on the loopback interface there too.

It follows Ray Train's ``_TorchBackend.on_start`` step for step otherwise (backend choice,
the distributed environment variables, one setup call per worker, the same shutdown), so it
is a subclass, and the only code of ours is how the store is made.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

#: rank 0's server store, kept alive in that worker process for the process group's life.
_SERVER: dict[str, Any] = {}


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


def _serve_store(addr: str, world_size: int, timeout_s: int) -> int:
    """On rank 0: a TCPStore listening on ``addr`` only; returns its port."""
    import torch.distributed as dist

    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(addr, port, world_size, True, timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.fileno())
    _SERVER.update(store=store, sock=sock)
    return port


def _join(backend: str, addr: str, port: int, rank: int, world_size: int,
          timeout_s: int) -> None:
    """On every worker: the process group over the store at ``addr:port``."""
    import torch.distributed as dist

    if _is_loopback(addr):
        # gloo picks its interface from the host name unless told; keep it on loopback too.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    store = _SERVER["store"] if rank == 0 else dist.TCPStore(
        addr, port, world_size, False, timedelta(seconds=timeout_s))
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: BoundStoreTorchConfig) -> None:
        import ray
        from ray.train._internal.utils import get_address_and_port
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
        from ray.train.torch.config import _set_torch_distributed_env_vars

        backend = backend_config.backend or "gloo"
        n = len(worker_group)
        addr, _ = worker_group.execute_single(0, get_address_and_port)
        port = worker_group.execute_single(0, _serve_store, addr, n, backend_config.timeout_s)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, _join, backend, addr, port, i, n,
                                                   backend_config.timeout_s)
                 for i in range(n)])


@dataclass
class BoundStoreTorchConfig(TorchConfig):
    """Ray Train's TorchConfig, with the process group's store on rank 0's address only."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend


__all__ = ["BoundStoreTorchConfig"]
