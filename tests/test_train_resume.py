"""Kill-and-resume: a stage I run SIGKILLed after its first checkpoint resumes from it, ends at
the same step count, and its loss curve continues (same schedule, same batches)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from factories import LISTENERS, LOOPBACK

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
CKPT_EVERY = 10


def _overrides(storage: Path) -> list[str]:
    return [
        "data.synthetic=true", "data.synthetic_slides=24", "model.name=care_tiny",
        "run.num_workers=2", f"run.storage_path={storage}", "run.name=resume-run",
        f"run.checkpoint_every={CKPT_EVERY}", "run.log_every=1", "run.keep_last=2",
        "optim.batch_size=4", "optim.warmup_steps=4", f"optim.steps={STEPS}", "optim.lr=1e-3",
        "ssl.out_dim=32", "ssl.patch_out_dim=32",
    ]


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the latest checkpoint Ray Train has registered (its snapshot names it)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    if not snap.exists():
        return None
    try:
        data = json.loads(snap.read_text())
    except json.JSONDecodeError:  # being rewritten right now
        return None
    results = data.get("checkpoint_results") or []
    steps = [r.get("metrics", {}).get("step") for r in results
             if isinstance(r, dict) and isinstance(r.get("metrics"), dict)]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


@pytest.mark.slow
def test_killed_run_resumes_and_continues(tmp_path):
    from care_scale.training.demo import load_stage_config
    from care_scale.training.loop import lr_at, read_metrics

    storage = tmp_path / "runs"
    run_dir = storage / "resume-run"
    # Each run also samples its TCP listeners throughout (Ray's, and the torch.distributed
    # store Ray Train serves on `*:port` unless care_scale binds it): the resumed run, which
    # gets to the end, prints them.
    script = LISTENERS + textwrap.dedent(f"""
        import shutil, threading, time
        from care_scale.training.demo import load_stage_config
        from care_scale.training.loop import fit
        seen, done = set(), threading.Event()

        def sample():
            deadline = time.monotonic() + 500
            while shutil.which("ss") and not done.is_set() and time.monotonic() < deadline:
                seen.update(listeners())
                time.sleep(0.3)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        cfg = load_stage_config("stage1", None, {_overrides(storage)!r})
        fit("stage1", cfg)
        done.set()
        t.join(15)
        print("RESULT " + json.dumps(sorted(seen)))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    # Own session: the kill reaches the driver and the Ray processes it started, nothing else.
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    killed_at = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline:
            step = _latest_checkpoint_step(run_dir)
            if step is not None:
                killed_at = step
                break
            if proc.poll() is not None:
                pytest.fail("training subprocess ended before its first checkpoint: "
                            + proc.stderr.read().decode()[-2000:])
            time.sleep(0.1)
        assert killed_at is not None, "no checkpoint within the time limit"
        # Kill 1-3 steps past a checkpoint boundary, judged by the steps logged (written before
        # each checkpoint): whatever checkpoint the resume then starts from is at or before
        # that boundary, so the steps after it are in the killed run's log, and the next
        # boundary is 7+ steps away. Ray Train registers checkpoints in its snapshot
        # asynchronously (seen a step behind the log), so the snapshot alone cannot say where
        # the run is.
        while time.time() < deadline and proc.poll() is None:
            logged = [r["step"] for r in read_metrics(str(run_dir))]
            killed_at = _latest_checkpoint_step(run_dir) or killed_at
            last = max(logged) if logged else 0
            if last > killed_at and 1 <= last % CKPT_EVERY <= 3:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert killed_at < STEPS, "the run finished before it could be killed"
    before = {row["step"]: row for row in read_metrics(str(run_dir))}
    assert max(before) < STEPS

    # The resumed run is a new process too (what a user does after a crash): same name and
    # storage path, so it resumes; bounded in time.
    again = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                           capture_output=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    if shutil.which("ss"):  # iproute2; every Linux CI image here has it
        (line,) = [ln for ln in again.stdout.decode().splitlines() if ln.startswith("RESULT ")]
        listeners = json.loads(line[len("RESULT "):])
        assert len(listeners) >= 4, listeners  # Ray's own, and the store: the sampling saw them
        assert all(re.match(LOOPBACK, a) for a in listeners), listeners
    cfg = load_stage_config("stage1", None, _overrides(storage))
    hist = read_metrics(str(run_dir))
    output = run_dir / "final"
    steps = [row["step"] for row in hist]
    assert steps == list(range(1, STEPS + 1)), steps  # one continuous curve, same length
    resumed = [row for row in hist if row.get("resumed_from") is not None]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] >= killed_at
    start = resumed[0]["resumed_from"]
    assert resumed[0]["step"] == start + 1
    # Same schedule: the learning rate continues where it was, not from warm-up again.
    o = cfg.optim
    for row in hist:
        expect = lr_at(row["step"] - 1, base=o.lr, min_lr=o.min_lr, warmup=o.warmup_steps,
                       start=0, length=o.steps)
        assert row["lr"] == pytest.approx(expect, rel=1e-6)
    # Same batches and restored weights: steps the killed run logged after its checkpoint are
    # recomputed to the same losses (a restart from scratch would not reproduce them).
    overlap = [s for s in before if s > start]
    assert overlap, "the killed run logged no step past its last checkpoint"
    for s in overlap:
        assert hist[s - 1]["loss"] == pytest.approx(before[s]["loss"], rel=1e-3, abs=1e-4)
    assert (output / "model.safetensors").exists()
    # Only the last keep_last checkpoints stay: the killed run's directories (which the
    # resumed run's checkpoint manager does not track) are pruned when fit() returns.
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    tracked = {r["checkpoint_dir_name"] for r in snap["checkpoint_results"]}
    assert len(tracked) <= cfg.run.keep_last
    ckpts = {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    assert ckpts == tracked, (ckpts, tracked)
    print(f"killed after checkpoint at step {killed_at}; resumed from {start}; "
          f"killed run had logged up to {max(before)}; {len(overlap)} recomputed steps matched; "
          f"loss {hist[0]['loss']:.3f} -> {hist[-1]['loss']:.3f}")
