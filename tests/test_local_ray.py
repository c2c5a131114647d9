"""Ray clusters that care-scale starts itself listen on loopback only (care_scale.local_ray).

Ray Train's process group (torch.distributed's store) is checked in test_train_resume.py,
whose resumed run samples its listeners (one training run fewer in the suite)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
from factories import LISTENERS, LOOPBACK

# In a fresh process (the switch works only before the first `import ray`): start the local
# cluster the job would, run a task, then list the TCP listeners of every process below it.
_CHILD = LISTENERS + r"""
from care_scale.local_ray import init_local
init_local(num_cpus=1, include_dashboard=False, log_to_driver=False)
import ray

@ray.remote
def ping():
    return os.getpid()

ray.get(ping.remote())
found = listeners()
ray.shutdown()
print("RESULT " + json.dumps(found))
"""


def _run_child(script: str, *args: str, timeout: int) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list sockets")
def test_local_cluster_listens_on_loopback_only():
    listeners = _run_child(_CHILD, timeout=180)
    assert len(listeners) >= 3  # GCS, raylet, object manager at least: the check saw them
    assert all(re.match(LOOPBACK, a) for a in listeners), listeners


def _processes_of(tmpdir: str) -> dict[int, str]:
    """Every process on this machine of the Ray session under the temp dir ``tmpdir``: the
    dir on its command line (Ray's servers), a file under it open (every Ray process keeps
    its log files there), or ``RAY_TMPDIR=tmpdir`` in its environment (inherited from the
    driver; what is left of it once Ray's process titles overwrote it)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
            links = []
            for fd in os.listdir(f"/proc/{entry}/fd"):
                try:
                    links.append(os.readlink(f"/proc/{entry}/fd/{fd}"))
                except OSError:
                    continue
        except OSError:
            continue
        if (tmpdir.encode() in cmd or f"RAY_TMPDIR={tmpdir}".encode() in env
                or any(link.startswith(tmpdir + "/") for link in links)):
            found[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace")[:100]
    return found


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds processes through /proc")
def test_a_killed_driver_leaves_no_ray_process_behind(tmp_path):
    """SIGKILL of a `care-scale embed` driver mid-run (its local cluster up, slides being
    committed): within seconds no process of that Ray session is left, the agents Ray would
    keep for a minute included (care_scale.local_ray's watchdog)."""
    import tempfile
    import time

    from deltalake import DeltaTable

    from care_scale.synthetic import write_synthetic_slide

    src = tmp_path / "src"
    src.mkdir()
    # One-slide commits, and enough slides that the job still runs when it is killed.
    n_slides = 40
    for i in range(n_slides):
        write_synthetic_slide(src / f"s{i}.tiff", width=1536, height=1024, mpp=0.5, seed=i % 3)
    warehouse = tmp_path / "wh"
    # Short: Ray's unix sockets live under it (108-byte limit).
    ray_tmp = tempfile.mkdtemp(prefix="csr-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    proc = subprocess.Popen(
        [sys.executable, "-m", "care_scale", "embed", str(src), "--warehouse", str(warehouse),
         "--set", "progress=none", "--set", "commit_every=1", "--set", "num_cpus=2"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        committed = 0
        while time.monotonic() < deadline and proc.poll() is None and not committed:
            try:
                committed = len(DeltaTable(str(warehouse / "slides")).to_pyarrow_table())
            except Exception:  # noqa: BLE001 - the table may not exist yet
                committed = 0
            time.sleep(0.2)
        assert proc.poll() is None and 0 < committed < n_slides, "not killed mid-run"
        before = _processes_of(ray_tmp)
        assert len(before) >= 4, before  # GCS, raylet, workers: the check sees them
        # The job's own cluster runs without the services it does not use (init_local).
        assert not [c for c in before.values()
                    if re.search(r"dashboard/dashboard\.py|monitor\.py", c)], before
        # Ray Data's stats actor and autoscaling coordinator run in the driver, mid-execution.
        assert not [c for c in before.values()
                    if re.search(r"_StatsActor|_AutoscalingCoordinatorActor", c)], before
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as a crash would
        proc.wait(timeout=30)
        killed_at = time.monotonic()
        left = before
        for _ in range(100):  # 20 s at most
            left = _processes_of(ray_tmp)
            if not left or time.monotonic() - killed_at > 20:
                break
            time.sleep(0.2)
        assert not left, (left, sorted(before.values()))
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _processes_of(ray_tmp):  # whatever a failed run left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)


# A stand-in driver: its watchdog is told a session dir, then it starts two "Ray" processes
# of that session (one holds a log file there open, one names the dir on its command line)
# and one bystander, prints their pids and waits to be killed.
_FAKE_DRIVER = r"""
import os, subprocess, sys, time
from care_scale.local_ray import _watchdog

session = sys.argv[1]
dog = _watchdog()
dog.stdin.write(session + "\n")
dog.stdin.flush()
sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
log = open(os.path.join(session, "logs", "worker.out"), "w")
holder = subprocess.Popen(sleeper, stdout=log, start_new_session=True)
named = subprocess.Popen(sleeper + [f"--session-dir={session}"], start_new_session=True)
bystander = subprocess.Popen(sleeper, start_new_session=True)
print(holder.pid, named.pid, bystander.pid, dog.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds processes through /proc")
def test_the_watchdog_kills_its_sessions_processes_once_the_driver_is_gone(tmp_path):
    """No Ray needed: what care_scale.local_ray's watchdog does when its driver is SIGKILLed
    (the processes of the session it was told go, within seconds; a bystander stays)."""
    import time

    session = tmp_path / "session_x"
    (session / "logs").mkdir(parents=True)
    driver = subprocess.Popen([sys.executable, "-c", _FAKE_DRIVER, str(session)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    pids = []
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        holder, named, bystander, dog = pids
        assert all(os.path.exists(f"/proc/{p}") for p in pids)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(p) for p in (holder, named, dog)):
            time.sleep(0.1)
        assert not any(_running(p) for p in (holder, named, dog)), pids
        assert _running(bystander)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if driver.poll() is None:
            driver.kill()
        driver.wait(timeout=10)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed child of a dead parent waits to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_services_left_out_of_a_local_cluster_are_back_after_its_start():
    """``init_local(head_services=False)`` makes Ray's head-service starters no-ops only
    while it starts its cluster (no Ray cluster needed to check that); a Ray that lacks one
    of them keeps them all."""
    from ray._private.node import Node

    from care_scale.local_ray import _HEAD_SERVICES, _without

    before = {name: getattr(Node, name) for name in _HEAD_SERVICES}
    with _without(_HEAD_SERVICES):
        assert all(getattr(Node, n)(None) is None and getattr(Node, n) is not before[n]
                   for n in _HEAD_SERVICES)
    assert {name: getattr(Node, name) for name in _HEAD_SERVICES} == before
    with _without((*_HEAD_SERVICES, "start_no_such_service")):
        assert {name: getattr(Node, name) for name in _HEAD_SERVICES} == before


def test_ray_data_actors_run_in_the_driver_only_inside_the_block(ray_local, monkeypatch):
    """Inside ``ray_data_actors_in_driver`` a Ray Data execution gets its stats actor and its
    autoscaling coordinator as instances of Ray Data's own classes in this process (the
    execution budgets its CPUs from the coordinator's answer, so a wrong one would run
    nothing); outside it, and with CARE_SCALE_RAY_HEAD_SERVICES=1, Ray Data's functions are
    its own."""
    import importlib

    import ray.data

    from care_scale.local_ray import _RAY_DATA_ACTORS, HEAD_SERVICES_ENV, ray_data_actors_in_driver

    modules = [(importlib.import_module(m), fn) for m, fn, _ in _RAY_DATA_ACTORS]
    before = [getattr(m, fn) for m, fn in modules]
    with ray_data_actors_in_driver() as in_driver:
        assert in_driver
        out = ray.data.range(40, override_num_blocks=4).map_batches(
            lambda b: {"id": b["id"] * 2}).take_all()
        handles = [getattr(m, fn)() for m, fn in modules]
        # Both were created by the execution, here: instances, not actor handles.
        assert all(type(h).__name__ == "_InDriverActor" and h._instance is not None
                   for h in handles)
        reserved = ray.get(handles[1].get_reserved_resources.remote("no-such-requester"))
        assert reserved == {}
    assert sorted(r["id"] for r in out) == list(range(0, 80, 2))
    assert [getattr(m, fn) for m, fn in modules] == before
    monkeypatch.setenv(HEAD_SERVICES_ENV, "1")
    with ray_data_actors_in_driver() as in_driver:
        assert not in_driver and [getattr(m, fn) for m, fn in modules] == before
