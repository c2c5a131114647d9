"""Ray clusters that care-scale starts itself listen on loopback only (care_scale.local_ray)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

# In a fresh process (the switch works only before the first `import ray`): start the local
# cluster the job would, run a task, then list the TCP listeners of every process below it.
_CHILD = r"""
import json, os, re, subprocess
from care_scale.local_ray import init_local
init_local(num_cpus=1, include_dashboard=False, log_to_driver=False)
import ray

@ray.remote
def ping():
    return os.getpid()

ray.get(ping.remote())

def children(pid):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out += [int(p)] + children(int(p))
    return out

tree = {os.getpid(), *children(os.getpid())}
listeners = []
for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
    pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
    if pids & tree:
        listeners.append(line.split()[3])
ray.shutdown()
print("RESULT " + json.dumps(listeners))
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list sockets")
def test_local_cluster_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                          "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, timeout=180, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    listeners = json.loads(lines[0][len("RESULT "):])
    assert len(listeners) >= 3  # GCS, raylet, object manager at least: the check saw them
    assert all(re.match(r"(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]):\d+$", a)
               for a in listeners), listeners
