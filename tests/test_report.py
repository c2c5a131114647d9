"""``care-scale report``: the static HTML page, parsed with html.parser always and loaded in
headless Chromium where the ``chromium`` binary is installed (Debian's package; CI has none).

Real tables: two slides embedded by the job's steps without Ray (``overlay_slides``), a run
recorded, a failure recorded, one slide's overlays made by ``care-scale show``.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from overlay_slides import embed_one
from PIL import Image

from care_scale.cli import main
from care_scale.embed.results import RowContext, build_failure
from care_scale.embed.sources import SlideSource
from care_scale.overlays.report import rate_series, sampled_rate_series
from care_scale.synthetic import write_synthetic_slide
from care_scale.timeline import MAX_SAMPLES, TileCounter, merge_counts
from care_scale.warehouse import Warehouse

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    wh = str(root / "wh")
    w = Warehouse(wh)
    w.ensure_tables()
    w.start_run("run-test", {"tissue": {}})
    syn = write_synthetic_slide(root / "syn.tif", width=3072, height=2048, mpp=0.5, seed=5)
    embed_one(str(syn.path), wh, "syn")
    embed_one(str(DATA / "CMU-1-Small-Region.svs"), wh, "cmu1")
    ctx = RowContext(run_id="run-test", version="v", care_version="c", patch_version="p",
                     keep_patches=False)
    w.record_failures([build_failure(ctx, SlideSource("broken", "/data/broken.svs"), "open",
                                     "CorruptSlideError", "/data/broken.svs: <truncated> tile")])
    w.finish_run("run-test", {"total": 3, "done": 2, "failed": 1, "tiles": 0})
    # Overlays for one slide only: the other card must say it has none.
    assert main(["show", "syn", "--warehouse", wh, "--out", f"{wh}/overlays"]) == 0
    out = root / "report.html"
    assert main(["report", "--warehouse", wh, "--out", str(out)]) == 0
    return out, w


class _Page(HTMLParser):
    """Tags with their attributes, ids, texts, in document order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def test_report_page_structure_and_self_contained(report):
    out, wh = report
    page = _Page()
    page.feed(out.read_text())
    page.close()
    ids = [a.get("id") for _, a in page.tags if a.get("id")]
    for section in ("summary", "gallery", "failures", "throughput"):
        assert section in ids
    cards = [a for t, a in page.tags if t == "div" and "card" in (a.get("class") or "")]
    assert sorted(c["data-slide"] for c in cards) == ["cmu1", "syn"]
    # Everything inline: pictures are data URIs, links are anchors in the page, no script.
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe")]
    srcs = [a["src"] for t, a in page.tags if t == "img"]
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    hrefs = [a["href"] for t, a in page.tags if t == "a"]
    assert all(h.startswith("#") for h in hrefs)
    assert all(h[1:] in ids for h in hrefs)  # every link lands on something
    # The slide with overlays: a card picture and two full pictures (regions, heatmap).
    alts = sorted(a["alt"] for t, a in page.tags if t == "img")
    assert alts == ["heatmap.png of syn", "regions of syn", "regions.png of syn"]
    text = " ".join(page.text)
    assert "no overlay (embed with --overlays)" in text
    assert "CorruptSlideError" in text and "<truncated> tile" in text  # escaped, shown
    # One regions table row per region of each slide, the ROI marked.
    n_regions = len(wh.read("regions"))
    rows = [a for t, a in page.tags if t == "tr" and a.get("class") in ("", "roi")]
    assert len(rows) == n_regions
    assert sum(a.get("class") == "roi" for a in rows) == 2
    lines = [a for t, a in page.tags if t == "polyline"]
    assert len(lines) == 1 and lines[0]["data-run"] == "run-test"
    assert len(lines[0]["points"].split()) > 2


def test_rate_series_counts_every_tile_once():
    from datetime import datetime, timedelta

    t0 = datetime(2026, 1, 1)
    slides = [{"embedded_at": t0 + timedelta(seconds=s), "num_patches": n}
              for s, n in ((1, 100), (2, 50), (9, 30), (10, 20))]
    series = rate_series(slides, t0, bins=5)
    width = series[0][0]
    assert width == pytest.approx(2.0) and len(series) == 5
    assert sum(rate * width for _, rate in series) == pytest.approx(200)
    assert series[0][1] == pytest.approx(50.0)  # 100 tiles by t=2 s (bin [0, 2))


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--no-first-run", "--disable-extensions", "--enable-logging=stderr",
                           "--v=0", *args], check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install "
                    "chromium); the html.parser test still checks the page")
def test_report_in_headless_chromium(report, tmp_path):
    out, _ = report
    url = out.resolve().as_uri()
    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="card"') == 2 and 'id="gallery"' in dom.stdout
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = tmp_path / "report.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1400,1100",
                    "--hide-scrollbars", url)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as im:
        px = np.asarray(im.convert("RGB"), np.float64)
    assert px.shape[:2] == (1100, 1400)
    # Not a blank page: the gallery's pictures are colourful.
    sat = px.max(axis=2) - px.min(axis=2)
    assert (sat > 60).mean() > 0.01
    # The click-through: the slide's modal is shown when its anchor is the target.
    modal = _chromium("--dump-dom", url + "#slide-syn")
    assert modal.returncode == 0 and 'id="slide-syn"' in modal.stdout


def test_sampled_rate_series_from_the_tiles_over_time_record():
    from datetime import datetime, timezone

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    s0 = t0.timestamp()
    # Start-up until t=4 s, then 100 tiles/s until t=8 s, then 50 tiles/s until t=12 s.
    record = [[s0 + 4, 0], [s0 + 6, 200], [s0 + 8, 400], [s0 + 12, 600]]
    series = sampled_rate_series(record, t0, bins=6)
    assert [x for x, _ in series] == pytest.approx([2, 4, 6, 8, 10, 12])
    assert [r for _, r in series] == pytest.approx([0, 0, 100, 100, 50, 50])
    assert sampled_rate_series(record[:1], t0) == []


def test_tile_counter_stays_bounded_and_merges_actors(monkeypatch):
    import care_scale.timeline as tl

    clock = [1000.0]
    monkeypatch.setattr(tl.time, "time", lambda: clock[0])
    a, b = TileCounter(), TileCounter()
    for _ in range(5 * MAX_SAMPLES):  # a long run: one batch of 10 tiles every 0.5 s
        clock[0] += 0.5
        a.add(10)
    assert len(a.samples) < MAX_SAMPLES and a.samples[-1] == [clock[0], 10 * 5 * MAX_SAMPLES]
    steps = [y[0] - x[0] for x, y in zip(a.samples[1:], a.samples[2:])]
    assert max(steps) <= 2 * min(steps) + 1  # evenly thinned, not truncated
    clock[0] += 1
    b.add(7)
    merged = merge_counts([a.samples, b.samples, []])
    assert merged[-1][1] == a.tiles + b.tiles and len(merged) <= MAX_SAMPLES
    assert merged[0][1] == 0 and all(x[1] <= y[1] for x, y in itertools.pairwise(merged))
