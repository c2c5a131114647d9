"""``care-scale report``: one self-contained static HTML page of a warehouse (or one run).

No server, no script, no network: every picture is inlined as a ``data:`` URI, the plot is
inline SVG, and the click-through is CSS (``:target``), so the page opens from disk in any
browser, with nothing to fail in its console. Sections:

- summary: slides, tiles, runs with their throughput, model versions, backends;
- gallery: one card per slide with its overlay picture (``WH/overlays/<slide_id>/regions.png``
  from ``--overlays`` or ``care-scale show --out WH/overlays``), scaled down; a click opens the
  full picture, the heatmap and the slide's regions table;
- failures: every ``failures`` row with its stage and reason;
- tiles/s over each run: from the tiles the encoder actors encoded over time, summed
  (``runs.counts_json`` -> ``tiles_over_time``, see ``care_scale.timeline.TileCounter``), in up to ``PLOT_BINS`` equal bins from the run's start; runs written
  before that record existed fall back to the tiles of the slides finished in each bin
  (``slides.embedded_at``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from care_scale.exceptions import TableError
from care_scale.storage import redact

GALLERY_SIDE = 360  # px, the card picture's longer side
FULL_SIDE = 1400  # px, the picture a click opens
PLOT_BINS = 24

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ddd;padding:4px 8px}
th{background:#eee;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:8px;width:372px}
.card img{max-width:360px;max-height:360px;display:block;margin:auto}
.card a{color:#1f5fa8;text-decoration:none;font-weight:600}
.missing{height:120px;display:flex;align-items:center;justify-content:center;color:#888}
.modal{display:none}.modal:target{display:block;position:fixed;inset:0;overflow:auto;
background:rgba(255,255,255,.98);padding:24px;z-index:10}
.modal img{max-width:100%;border:1px solid #ccc;margin:8px 0}
.close{float:right;font-size:20px}.roi{background:#fff3b0}
"""


@dataclass
class ReportData:
    """What the page shows, read from the tables (and the overlay folders)."""

    warehouse: str
    run_id: str | None
    slides: list[dict[str, Any]] = field(default_factory=list)
    regions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pictures: dict[str, dict[str, bytes]] = field(default_factory=dict)  # slide -> name -> png


_SLIDE_COLS = ["slide_id", "model_version", "num_patches", "num_regions", "roi_region_id",
               "backend", "slide_backend", "run_id", "cohort", "width", "height", "mpp",
               "embedded_at", "source_uri"]
_REGION_COLS = ["slide_id", "model_version", "region_id", "num_patches", "coverage",
                "semantic_weight", "fused_weight", "is_roi"]


def _table_rows(wh: Any, name: str, columns: list[str], run_id: str | None) -> list[dict]:
    import pyarrow.compute as pc

    dt = wh.open(name)
    if dt is None:
        return []
    flt = (pc.field("run_id") == run_id) if run_id and "run_id" in columns else None
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=flt).to_pylist()


def read_report_data(warehouse: str, *, run_id: str | None = None, max_slides: int = 200,
                     storage_options: dict[str, Any] | None = None) -> ReportData:
    """The tables' rows for the page; ``run_id``: only that run's slides, failures, run."""
    import pyarrow.compute as pc

    from care_scale.overlays import files
    from care_scale.warehouse import Warehouse

    wh = Warehouse(warehouse, storage_options=storage_options)
    data = ReportData(warehouse=redact(warehouse), run_id=run_id)
    data.runs = _table_rows(wh, "runs", ["run_id", "started_at", "finished_at", "counts_json",
                                         "config_json"], run_id)
    if run_id and not data.runs:
        raise TableError("runs", f"no run {run_id!r} in {redact(warehouse)}")
    if wh.open("slides") is None and not data.runs:
        raise TableError("slides", f"no table at {redact(wh.table_uri('slides'))}")
    data.slides = sorted(_table_rows(wh, "slides", _SLIDE_COLS, run_id),
                         key=lambda r: (r["slide_id"], r["model_version"]))
    data.failures = sorted(_table_rows(wh, "failures", ["slide_id", "uri", "run_id", "stage",
                                                        "error_type", "message", "failed_at"],
                                       run_id), key=lambda r: (r["slide_id"], r["stage"]))
    shown = {(s["slide_id"], s["model_version"]) for s in data.slides[:max_slides]}
    regions = wh.open("regions")
    rows = [] if regions is None or not shown else regions.to_pyarrow_dataset().to_table(
        columns=_REGION_COLS, filter=pc.field("slide_id").isin(sorted({s for s, _ in shown}))
    ).to_pylist()
    for r in rows:
        if (r["slide_id"], r["model_version"]) in shown:
            data.regions.setdefault(f"{r['slide_id']}|{r['model_version']}", []).append(r)
    for s in data.slides[:max_slides]:
        sid = s["slide_id"]
        folder = files.overlay_folder(warehouse, sid)
        got = {}
        for name in (files.REGIONS_PNG, files.HEATMAP_PNG):
            try:
                got[name] = files.get(folder, name, storage_options)
            except OSError:
                continue  # embedded without --overlays: the card says so
        data.pictures[sid] = got
    return data


def _img_uri(png: bytes, side: int) -> str:
    """A JPEG data URI of the picture, its longer side at most ``side``."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: Any, fmt: str = "{:,}") -> str:
    return f'<td class="num">{_e(fmt.format(v)) if v is not None else ""}</td>'


def _table(head: list[str], rows: list[str], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _seconds(a: Any, b: Any) -> float | None:
    if isinstance(a, datetime) and isinstance(b, datetime):
        return max(0.0, (b - a).total_seconds())
    return None


def _summary(data: ReportData) -> str:
    tiles = sum(int(s["num_patches"] or 0) for s in data.slides)
    versions = sorted({s["model_version"] for s in data.slides})
    backends = sorted({f"{s['backend']} / {s['slide_backend']}" for s in data.slides})
    rows = []
    for r in sorted(data.runs, key=lambda r: str(r["started_at"])):
        counts = json.loads(r["counts_json"] or "{}")
        secs = _seconds(r["started_at"], r["finished_at"])
        rate = counts.get("tiles", 0) / secs if secs else None
        rows.append(f"<tr><td>{_e(r['run_id'])}</td><td>{_e(r['started_at'])}</td>"
                    + _num(counts.get("total")) + _num(counts.get("done"))
                    + _num(counts.get("failed")) + _num(counts.get("tiles"))
                    + _num(secs, "{:,.1f}") + _num(rate, "{:,.1f}") + "</tr>")
    facts = [("slides", f"{len({s['slide_id'] for s in data.slides}):,}"),
             ("tiles", f"{tiles:,}"), ("failures", f"{len(data.failures):,}"),
             ("model versions", ", ".join(versions) or "none"),
             ("patch backend / slide backend", ", ".join(backends) or "none")]
    dl = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    runs = _table(["run", "started", "slides", "done", "failed", "tiles", "seconds",
                   "tiles/s"], rows, "runs") if rows else "<p>No runs recorded.</p>"
    return f'<section id="summary"><h2>Summary</h2><table>{dl}</table><h3>Runs</h3>{runs}</section>'


def _modal(sid: str, s: dict[str, Any], pics: dict[str, bytes], regions: list[dict]) -> str:
    from care_scale.overlays import files

    imgs = "".join(f'<img alt="{_e(name)} of {_e(sid)}" src="{_img_uri(pics[name], FULL_SIDE)}">'
                   for name in (files.REGIONS_PNG, files.HEATMAP_PNG) if name in pics)
    rows = [f'<tr class="{"roi" if r["is_roi"] else ""}"><td>{r["region_id"]}</td>'
            + _num(r["num_patches"]) + _num(r["coverage"], "{:.4f}")
            + _num(r["semantic_weight"], "{:.4f}") + _num(r["fused_weight"], "{:.4f}")
            + f"<td>{'ROI' if r['is_roi'] else ''}</td></tr>"
            for r in sorted(regions, key=lambda r: -float(r["fused_weight"]))]
    table = _table(["region", "patches", "coverage", "semantic weight", "fused weight", ""],
                   rows, "regions")
    return (f'<section class="modal" id="slide-{_e(sid)}"><a class="close" href="#gallery">'
            f'close</a><h2>{_e(sid)}</h2><p>{_e(s["width"])} x {_e(s["height"])} px at '
            f'{_e(s["mpp"])} um/px; model {_e(s["model_version"])}; source '
            f'{_e(s["source_uri"])}</p>{imgs or "<p>No overlay pictures.</p>"}{table}</section>')


def _gallery(data: ReportData, max_slides: int) -> str:
    from care_scale.overlays import files

    cards, modals = [], []
    for s in data.slides[:max_slides]:
        sid = s["slide_id"]
        pics = data.pictures.get(sid, {})
        pic = (f'<img alt="regions of {_e(sid)}" src="{_img_uri(pics[files.REGIONS_PNG], GALLERY_SIDE)}">'
               if files.REGIONS_PNG in pics else
               '<div class="missing">no overlay (embed with --overlays)</div>')
        cards.append(f'<div class="card" data-slide="{_e(sid)}"><a href="#slide-{_e(sid)}">'
                     f'{pic}{_e(sid)}</a><br>{_e(s["num_patches"])} tiles, '
                     f'{_e(s["num_regions"])} regions, ROI region {_e(s["roi_region_id"])}</div>')
        modals.append(_modal(sid, s, pics, data.regions.get(f"{sid}|{s['model_version']}", [])))
    more = (f"<p>{len(data.slides) - max_slides} more slides not shown (--max-slides).</p>"
            if len(data.slides) > max_slides else "")
    return (f'<section id="gallery"><h2>Gallery</h2><div class="gallery">{"".join(cards)}</div>'
            f'{more}</section>{"".join(modals)}')


def _failures(data: ReportData) -> str:
    rows = [f"<tr><td>{_e(f['slide_id'])}</td><td>{_e(f['stage'])}</td>"
            f"<td>{_e(f['error_type'])}</td><td>{_e(f['message'])}</td><td>{_e(f['run_id'])}"
            f"</td></tr>" for f in data.failures]
    body = (_table(["slide", "stage", "error", "reason", "run"], rows, "failures") if rows
            else "<p>No failures.</p>")
    return f'<section id="failures"><h2>Failures</h2>{body}</section>'


def rate_series(slides: list[dict[str, Any]], start: datetime | None,
                bins: int | None = None) -> list[tuple[float, float]]:
    """(seconds since ``start`` at the bin's end, tiles/s in the bin) for the slides of one
    run, from when each slide's row was made; ``bins``: default one per slide, 4 to 24."""
    done = sorted((s["embedded_at"], int(s["num_patches"] or 0)) for s in slides
                  if isinstance(s.get("embedded_at"), datetime))
    if not done:
        return []
    bins = bins or max(4, min(PLOT_BINS, len(done)))
    t0 = start if isinstance(start, datetime) and start <= done[0][0] else done[0][0]
    end = max(1e-3, (done[-1][0] - t0).total_seconds())
    width = end / bins
    counts = [0] * bins
    for t, n in done:
        counts[min(bins - 1, int((t - t0).total_seconds() / width))] += n
    return [((i + 1) * width, c / width) for i, c in enumerate(counts)]


def sampled_rate_series(samples: list[list[float]], start: datetime | None,
                        bins: int = PLOT_BINS) -> list[tuple[float, float]]:
    """(seconds since ``start`` at the bin's end, tiles/s in the bin) from a run's
    ``tiles_over_time`` record (epoch seconds, cumulative tiles), the cumulative count
    interpolated linearly between samples; the time before the first sample (Ray and model
    start-up) is a stretch at 0 tiles/s."""
    import numpy as np

    if len(samples) < 2:
        return []
    t, n = np.asarray(samples, float).T
    t0 = start.timestamp() if isinstance(start, datetime) and start.timestamp() <= t[0] else t[0]
    end = t[-1] - t0
    if end <= 0:
        return []
    edges = t0 + np.linspace(0.0, end, bins + 1)
    cum = np.interp(edges, t, n, left=0.0)
    width = edges[1] - edges[0]
    return [(float(e - t0), float(d / width)) for e, d in zip(edges[1:], np.diff(cum))]


def _svg_plot(series: dict[str, list[tuple[float, float]]]) -> str:
    """Inline SVG: tiles/s against seconds since the run started, one line per run."""
    w, h, ml, mb, mt, mr = 760, 300, 70, 44, 16, 16
    pts = [p for s in series.values() for p in s]
    xmax = max((p[0] for p in pts), default=1.0) or 1.0
    ymax = max((p[1] for p in pts), default=1.0) * 1.1 or 1.0
    colours = ["#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#17becf"]
    frame = (f'<rect x="{ml}" y="{mt}" width="{w - ml - mr}" height="{h - mt - mb}" '
             'fill="#fff" stroke="#999"/>')
    head = f'<svg width="{w}" height="{h}" role="img" aria-label="tiles per second over the run">'
    out = [head, frame]

    def sx(x: float) -> float:
        return ml + x / xmax * (w - ml - mr)

    def sy(y: float) -> float:
        return h - mb - y / ymax * (h - mt - mb)

    for i in range(6):
        xv, yv = xmax * i / 5, ymax * i / 5
        out.append(f'<text x="{sx(xv):.1f}" y="{h - mb + 16}" font-size="12" '
                   f'text-anchor="middle">{xv:.0f}</text>')
        out.append(f'<text x="{ml - 6}" y="{sy(yv) + 4:.1f}" font-size="12" '
                   f'text-anchor="end">{yv:.0f}</text>')
        out.append(f'<line x1="{ml}" x2="{w - mr}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" '
                   'stroke="#eee"/>')
    out.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 6}" font-size="13" '
               'text-anchor="middle">seconds since the run started</text>')
    out.append(f'<text x="14" y="{(mt + h - mb) / 2}" font-size="13" text-anchor="middle" '
               f'transform="rotate(-90 14 {(mt + h - mb) / 2})">tiles/s</text>')
    for i, (run, s) in enumerate(series.items()):
        c = colours[i % len(colours)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in [(0.0, 0.0), *s])
        out.append(f'<polyline class="rate" data-run="{_e(run)}" fill="none" stroke="{c}" '
                   f'stroke-width="2" points="{line}"/>')
        out.append(f'<text x="{w - mr - 6}" y="{mt + 16 + 16 * i}" font-size="12" '
                   f'text-anchor="end" fill="{c}">{_e(run)}</text>')
    out.append("</svg>")
    return "".join(out)


def _plot(data: ReportData) -> str:
    series = {}
    for r in data.runs:
        samples = json.loads(r["counts_json"] or "{}").get("tiles_over_time")
        if samples:
            s = sampled_rate_series(samples, r["started_at"])
        else:
            own = [s for s in data.slides if s["run_id"] == r["run_id"]]
            s = rate_series(own, r["started_at"])
        if s:
            series[r["run_id"]] = s
    body = _svg_plot(series) if series else "<p>No finished slides to plot.</p>"
    return f'<section id="throughput"><h2>Tiles/s over the run</h2>{body}</section>'


def render_report(data: ReportData, *, max_slides: int = 200) -> str:
    title = f"care-scale report: {data.warehouse}" + (f", run {data.run_id}" if data.run_id
                                                      else "")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1>{_summary(data)}{_gallery(data, max_slides)}"
            f"{_failures(data)}{_plot(data)}</body></html>\n")


def write_report(warehouse: str, out: str, *, run_id: str | None = None,
                 max_slides: int = 200, storage_options: dict[str, Any] | None = None
                 ) -> ReportData:
    """Read the warehouse and write the page to ``out`` (local path or URI)."""
    from care_scale.storage import write_text

    data = read_report_data(warehouse, run_id=run_id, max_slides=max_slides,
                            storage_options=storage_options)
    write_text(out, render_report(data, max_slides=max_slides), storage_options)
    return data


__all__ = ["ReportData", "rate_series", "read_report_data", "render_report", "write_report"]
