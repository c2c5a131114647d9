"""The console status lines: the embedding job's (slides, tiles) and the summary, and
training's (read from the metrics file the workers write, while fit runs)."""

from __future__ import annotations

import io
import json
import time

from care_scale.training import progress as P


def test_the_status_line_follows_the_metrics_file(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "POLL_SECONDS", 0.05)
    out = io.StringIO()
    rows = [{"step": 2, "loss": 1.25, "lr": 1e-3}, {"step": 4, "loss": 0.5, "lr": 1e-3}]
    with P.watch("stage1", str(tmp_path), 10, None, mode="log") as prog:
        prog.stream, prog.log_every = out, 0.0
        time.sleep(0.2)  # nothing written yet: the workers are starting
        for i in range(len(rows)):
            (tmp_path / "metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows[:i + 1]))
            deadline = time.monotonic() + 5
            while f"step {rows[i]['step']}/10" not in out.getvalue():
                assert time.monotonic() < deadline, out.getvalue()
                time.sleep(0.05)
    text = out.getvalue()
    assert "stage1 starting the workers" in text
    assert "stage1 step 2/10 | loss 1.2500" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("stage1 step 4/10 | loss 0.5000 |") and "ETA" in last


def test_progress_line_and_summary():
    import io

    from care_scale.embed.progress import Progress, RunSummary

    out = io.StringIO()
    p = Progress(5, skipped=1, mode="log", stream=out, log_every=0)
    p.add_tiles(100)
    p.slide_done()
    p.slide_failed()
    p.close()
    assert "slides 2/4 (skipped 1, failed 1) | tiles 100" in out.getvalue().splitlines()[-1]
    s = RunSummary(run_id="r", warehouse="w", model_version="v", backend="torch", total=5,
                   skipped=1, done=3, failed=1, tiles=90, seconds=3.0,
                   failures=[("x", "CorruptSlideError", "x.svs: damaged")])
    text = s.format()
    assert "3 slide(s) embedded, 1 already done, 1 failed, of 5 listed" in text
    assert "30 tiles/s" in text and "FAILED x: CorruptSlideError: x.svs: damaged" in text
