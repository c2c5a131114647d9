"""Ray clusters that care-scale starts on this machine listen on 127.0.0.1 only.

Left to itself, ``ray.init(address="local")`` binds its GCS, raylet, worker and agent servers
to every interface and to the machine's routable address. Ray chooses the address when the
``ray`` package is *imported*: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` it uses loopback
for everything, as it does on macOS and Windows. So the variable must be set before the first
``import ray`` of the process, and only for clusters of our own: a driver joining a real
multi-node cluster (``RAY_ADDRESS``) must keep its routable address.

Such a cluster also dies with its driver. Ray ties its GCS and raylet to the driver
(``PR_SET_PDEATHSIG``) and workers follow the raylet within a second or two, but the dashboard
and runtime-env agents, on noticing the raylet gone, first try to report it to the dead GCS
and wait out a fixed 60 s RPC timeout (Ray 2.x ``process_watcher``; no setting shortens it).
So :func:`init_local` starts a small watchdog, a child of the driver that is told each session
directory the driver's clusters use: once the driver is gone (the watchdog is re-parented), it
kills every process that has that session on its command line or a file of it open (Ray's
servers, agents and workers all keep their log files there; the environment would not do:
Ray's process titles overwrite it) and exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
#: How often the watchdog looks at its parent, and how long it goes on killing a session's
#: processes once the driver is gone (a raylet may still be starting a worker), in seconds.
WATCH_INTERVAL_S = 0.2
REAP_FOR_S = 10.0

_WATCHDOG: dict[int, subprocess.Popen] = {}  # driver pid -> its watchdog


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


#: ``1`` keeps the head services that ``init_local(head_services=False)`` leaves out.
HEAD_SERVICES_ENV = "CARE_SCALE_RAY_HEAD_SERVICES"
#: What ``head_services=False`` leaves out: ``ray.init`` starts them on every head node, and
#: has no option to leave them out. The log monitor only where ``log_to_driver=False``: it
#: tails the workers' log files for the drivers that print them.
_HEAD_SERVICES = ("start_api_server", "start_monitor")
_LOG_MONITOR = "start_log_monitor"


def init_local(*, head_services: bool = True, **kwargs: Any) -> None:
    """``ray.init(address="local", **kwargs)``: a fresh single-node cluster on loopback.

    ``head_services=False`` (the embedding job's own cluster; ``CARE_SCALE_RAY_HEAD_SERVICES=1``
    keeps them): without the dashboard's API server (which ``include_dashboard=False`` still
    starts, to serve job submission, the state API and usage stats, and which ``ray.init``
    waits for), the autoscaler monitor (a one-node cluster has nothing to scale) and, with
    ``log_to_driver=False``, the log monitor (no driver prints the workers' logs; they stay
    in their files). Each is a Python process of 50-90 MiB and ~1 CPU s, and the API server
    is 2.5-5 s on the critical path of a 2-core machine's start-up
    (``benchmarks/bench_fixed_cost.py``). What the job uses stays: GCS, raylet, its agents
    (metrics, runtime environments), the workers.
    """
    if not loopback_only():
        log.warning("ray was imported before care-scale started its local cluster, so Ray's "
                    "servers may listen beyond 127.0.0.1; set %s=0 before importing ray",
                    LOOPBACK_ENV)
    import ray

    quiet_console()
    watchdog = _watchdog()
    if head_services or os.environ.get(HEAD_SERVICES_ENV) == "1":
        ray.init(address="local", **kwargs)
    else:
        skip = _HEAD_SERVICES + (() if kwargs.get("log_to_driver", True) else (_LOG_MONITOR,))
        with _without(skip):
            ray.init(address="local", **kwargs)
    session = _session_dir(ray)
    if watchdog is not None and watchdog.stdin is not None and session:
        try:
            watchdog.stdin.write(session + "\n")
            watchdog.stdin.flush()
        except OSError as exc:  # the watchdog is gone: the cluster runs on without it
            log.debug("local Ray watchdog unreachable: %s", exc)


@contextlib.contextmanager
def _without(services: tuple[str, ...]) -> Iterator[None]:
    """While ``ray.init`` starts a head node in this thread: the ``Node`` methods named in
    ``services`` (Ray's private API) are no-ops. They are restored after, so every other
    cluster of this process starts as Ray starts it; where a Ray release renamed one,
    nothing is left out."""
    from ray._private import node

    originals = {name: getattr(node.Node, name) for name in services
                 if callable(getattr(node.Node, name, None))}
    if len(originals) < len(services):
        log.debug("this Ray lacks one of %s: every service starts", services)
        originals = {}
    try:
        for name in originals:
            setattr(node.Node, name, _skip_head_service)
        yield
    finally:
        for name, method in originals.items():
            setattr(node.Node, name, method)


def _skip_head_service(self: Any, *args: Any, **kwargs: Any) -> None:
    return None


#: Ray Data's two per-cluster actors, (module, its get-or-create function, the actor class):
#: :func:`ray_data_actors_in_driver` runs them in the driver.
_RAY_DATA_ACTORS = (
    ("ray.data._internal.stats", "get_or_create_stats_actor", "_StatsActor"),
    ("ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator",
     "get_or_create_autoscaling_coordinator", "_AutoscalingCoordinatorActor"),
)


@contextlib.contextmanager
def ray_data_actors_in_driver() -> Iterator[bool]:
    """While a Ray Data execution runs on a one-node cluster of our own: its stats actor and
    its autoscaling coordinator are instances of Ray Data's own classes in this process, not
    actors of their own (yields whether they are; ``CARE_SCALE_RAY_HEAD_SERVICES=1`` keeps
    the actors).

    Each is otherwise a detached worker process that imports Ray Data (120 MiB PSS and 1.5
    CPU s each on a 2-core node), and the coordinator is on the critical path: an execution
    budgets zero CPUs until the coordinator first answers (Ray 2.60's rate-based cluster
    autoscaler asks it for the resources reserved to it), so no decode task starts before
    that process is up, 3.5 s into a job whose actors start at the same time
    (``benchmarks/bench_fixed_cost.py --processes``). A one-node cluster has no dashboard to
    read the stats and nothing to scale; the instances answer the same calls the same way
    (``handle.method.remote(...)`` -> a ref to the result), one call at a time as an actor
    does. Ray Data's functions that create the actors (Ray's private API) are replaced only
    inside this block; where a Ray release moved one, both stay actors.
    """
    import importlib

    if os.environ.get(HEAD_SERVICES_ENV) == "1":
        yield False
        return
    try:
        targets = [(importlib.import_module(mod), fn, cls) for mod, fn, cls in _RAY_DATA_ACTORS]
    except ImportError as exc:
        log.debug("Ray Data's actors stay actors: %s", exc)
        yield False
        return
    if not all(callable(getattr(m, fn, None)) and hasattr(m, cls) for m, fn, cls in targets):
        log.debug("this Ray Data lacks one of %s: its actors stay actors", _RAY_DATA_ACTORS)
        yield False
        return
    originals = {(m, fn): getattr(m, fn) for m, fn, _ in targets}
    handles: list[_InDriverActor] = []
    try:
        for module, fn, cls in targets:
            actor_cls = getattr(module, cls)
            # A @ray.remote class (the stats actor) or a plain one (the coordinator).
            plain = getattr(actor_cls, "__ray_actor_class__", actor_cls)
            handle = _InDriverActor(plain)
            handles.append(handle)
            setattr(module, fn, handle.get_or_create)
        yield True
    finally:
        for (module, fn), original in originals.items():
            setattr(module, fn, original)
        for handle in handles:
            handle.close()


class _InDriverActor:
    """One instance of an actor class in this process, behind an actor handle's calling
    convention: ``handle.method.remote(*args)`` runs the method now, under a lock (an actor
    runs one call at a time), and returns ``ray.put`` of its result."""

    def __init__(self, cls: type):
        self._cls, self._instance, self._closed = cls, None, False
        self._lock = threading.RLock()

    def get_or_create(self, *args: Any, **kwargs: Any) -> _InDriverActor:
        with self._lock:
            if self._instance is None:
                owner = self
                # The coordinator re-plans every 20 s on a thread of its own, which would
                # outlive the job's cluster: it ticks only while the block is open.
                tick = getattr(self._cls, "_tick", None)
                cls = self._cls if tick is None else type(self._cls.__name__, (self._cls,), {
                    "_tick": lambda inst: None if owner._closed else tick(inst)})
                self._instance = cls()
        return self

    def __getattr__(self, name: str) -> _InDriverMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        self.get_or_create()
        return _InDriverMethod(self, getattr(self._instance, name))

    def close(self) -> None:
        self._closed = True


class _InDriverMethod:
    def __init__(self, actor: _InDriverActor, method: Any):
        self._actor, self._method = actor, method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        import ray

        # An actor's failing call fails only its own ref, which Ray Data's callers of these
        # (metrics updates, resource requests) mostly never read: logged, not raised here.
        result = None
        with self._actor._lock:
            try:
                result = self._method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - see above
                log.warning("Ray Data's %s.%s failed in the driver: %s",
                            self._actor._cls.__name__, self._method.__name__, exc)
        return ray.put(result)


def _session_dir(ray: Any) -> str | None:
    """The session directory (/tmp/ray/session_...) of this driver's cluster, its own."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    return node.get_session_dir_path() if node is not None else None


def _watchdog() -> subprocess.Popen | None:
    """This driver's watchdog (one per driver process), started on the first call; None
    where there is no /proc to find a session's processes by (not Linux)."""
    if not os.path.isdir("/proc/self"):
        return None
    proc = _WATCHDOG.get(os.getpid())
    if proc is None or proc.poll() is not None:
        # This file as a script, isolated (-I: stdlib only, whatever sys.path the driver
        # has); in a session of its own: a Ctrl-C to the driver's group leaves it to clean up.
        proc = subprocess.Popen(
            [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True, close_fds=True)
        _WATCHDOG[os.getpid()] = proc
    return proc


def session_pids(sessions: list[str]) -> list[int]:
    """Processes on this machine (this one aside) of these Ray sessions: a session
    directory on their command line or a file under it open."""
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and int(entry) != os.getpid()
            and any(_of_session(entry, s) for s in sessions)]


def _of_session(pid: str, session: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if session.encode() in f.read():
                return True
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone meanwhile, or not ours to read
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(session + "/"):
                return True
        except OSError:
            continue
    return False


def reap(sessions: list[str], *, for_s: float = REAP_FOR_S) -> int:
    """SIGKILL every process of these sessions, again until none is left or ``for_s``
    passed; how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + for_s
    while sessions:
        for pid in set(session_pids(sessions)) - killed:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                continue
        if not session_pids(sessions) or time.monotonic() > deadline:
            break
        time.sleep(WATCH_INTERVAL_S)
    return len(killed)


def watch(driver_pid: int) -> None:
    """The watchdog: collect session directories from stdin, one a line, until the driver
    is gone (we are re-parented), then reap those sessions."""
    sessions: list[str] = []

    def read() -> None:
        for line in sys.stdin:
            if line.strip():  # as named (command lines) and resolved (open files' links)
                sessions.extend({line.strip(), os.path.realpath(line.strip())})

    threading.Thread(target=read, daemon=True).start()
    while os.getppid() == driver_pid:
        time.sleep(WATCH_INTERVAL_S)
    time.sleep(WATCH_INTERVAL_S)  # a line the driver wrote just before it died
    reap(list(sessions))


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


__all__ = ["HEAD_SERVICES_ENV", "LOOPBACK_ENV", "init_local", "loopback_only", "quiet_console",
           "ray_data_actors_in_driver", "reap", "session_pids", "watch"]


if __name__ == "__main__":  # the watchdog process (_watchdog)
    watch(int(sys.argv[1]))
