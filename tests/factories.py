"""Synthetic per-slide results for warehouse, query and Spark tests (shared, not a test module).

Imported as ``from factories import ...``: pytest puts tests/ on sys.path (rootdir-less test
folder, default "prepend" import mode), which also holds when CI runs plain ``pytest``.
"""

from __future__ import annotations

import numpy as np

from care_scale.warehouse import SlideResult

DIM, FDIM = 16, 8


def fake_result(slide_id: str, *, n: int = 30, seed: int = 0, mv: str = "care_tiny-abc",
                patches: bool = True) -> SlideResult:
    rng = np.random.default_rng(seed)
    coords = np.stack(np.meshgrid(np.arange(6) * 224, np.arange(5) * 224), -1).reshape(-1, 2)
    coords = coords[:n].astype(np.int64)
    rop = np.arange(n) % 3
    regions = []
    for r in range(3):
        c = coords[rop == r]
        regions.append({"region_id": r, "num_patches": len(c), "coverage": 0.3,
                        "semantic_weight": 0.2 + r / 10, "fused_weight": 0.1 * (r + 1),
                        "is_roi": r == 2, "bbox_x0": int(c[:, 0].min()),
                        "bbox_y0": int(c[:, 1].min()), "bbox_x1": int(c[:, 0].max()) + 224,
                        "bbox_y1": int(c[:, 1].max()) + 224,
                        "geometry": "MULTIPOLYGON (((0 0, 224 0, 224 224, 0 224, 0 0)))",
                        "embedding": rng.normal(size=DIM).astype(np.float32)})
    slide = {"slide_id": slide_id, "model_version": mv, "source_uri": f"/data/{slide_id}.svs",
             "source_size": 1234, "source_etag": None, "width": 2000, "height": 1500,
             "mpp": 0.5, "mpp_source": "file", "target_mpp": 0.5, "patch_size": 224,
             "patch_size_level0": 224, "num_patches": n, "num_regions": 3,
             "slide_embedding": rng.normal(size=DIM).astype(np.float32), "roi_region_id": 2,
             "roi_embedding": regions[2]["embedding"], "backend": "torch", "run_id": "run1",
             "cohort": "A", "metadata": {"site": "oslo", "age": 61}, "embedded_at": 1.7e9}
    p = None
    if patches:
        p = {"x": coords[:, 0], "y": coords[:, 1], "patch_size_level0": np.full(n, 224),
             "region_id": rop, "tissue_fraction": np.full(n, 0.9, np.float32),
             "feature": rng.normal(size=(n, FDIM)).astype(np.float32)}
    return SlideResult(slide=slide, regions=regions, patches=p)


def write_cohort(wh, embeddings: np.ndarray, *, ids: list[str] | None = None,
                 mv: str = "care_tiny-abc", metadata: list[dict] | None = None,
                 seed: int = 0) -> list[str]:
    """Many slides at once, straight into the slides and regions tables with the real schemas
    (one Delta append each, not one file per slide as the job writes): slide embedding
    ``embeddings[i]``, ROI and regions = it plus noise. No Ray, no patches."""
    from deltalake import write_deltalake

    from care_scale.warehouse import schemas as S

    rng = np.random.default_rng(seed)
    ids = ids or [f"slide_{i:04d}" for i in range(len(embeddings))]
    results = []
    for i, (sid, emb) in enumerate(zip(ids, embeddings)):
        r = fake_result(sid, seed=i, mv=mv, patches=False)
        r.slide["slide_embedding"] = np.asarray(emb, np.float32)
        for reg in r.regions:
            reg["embedding"] = (emb + 0.3 * rng.normal(size=DIM)).astype(np.float32)
        r.slide["roi_embedding"] = r.regions[2]["embedding"]
        r.slide["metadata"] = (metadata[i] if metadata else {})
        results.append(r)
    for name, build, schema in (("regions", wh._regions_table, S.regions_schema(DIM)),
                                ("slides", wh._slides_table, S.slides_schema(DIM))):
        wh._create(name, schema)
        write_deltalake(wh.table_uri(name), build(results, DIM), mode="append")
    return ids


def write_dicom_wsm(path, *, image_type: bool = True, side: int = 16) -> None:
    """A minimal VL Whole Slide Microscopy instance (explicit VR little endian, one RGB
    frame of ``side`` px, TILED_FULL), written byte by byte (no DICOM library needed);
    ``image_type=False`` leaves out ImageType (0008,0008), as some exporters do."""
    import struct

    def el(group: int, elem: int, vr: str, value) -> bytes:
        if isinstance(value, str):
            value = value.encode()
            if len(value) % 2:
                value += b"\0" if vr == "UI" else b" "
        if vr in ("OB", "OW", "SQ", "UN", "UT"):
            return struct.pack("<HH2sHI", group, elem, vr.encode(), 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value

    def us(v: int) -> bytes:
        return struct.pack("<H", v)

    def ul(v: int) -> bytes:
        return struct.pack("<I", v)

    wsm = "1.2.840.10008.5.1.4.1.1.77.1.6"
    meta = (el(2, 1, "OB", b"\0\1") + el(2, 2, "UI", wsm) + el(2, 3, "UI", "1.2.3.4.5")
            + el(2, 0x10, "UI", "1.2.840.10008.1.2.1"))
    body = [el(8, 8, "CS", "DERIVED\\PRIMARY\\VOLUME\\NONE")] if image_type else []
    body += [
        el(8, 0x16, "UI", wsm), el(8, 0x18, "UI", "1.2.3.4.5"), el(0x20, 0x0D, "UI", "1.2.3"),
        el(0x20, 0x0E, "UI", "1.2.3.4"), el(0x20, 0x9311, "CS", "TILED_FULL"),
        el(0x28, 2, "US", us(3)), el(0x28, 4, "CS", "RGB"), el(0x28, 6, "US", us(0)),
        el(0x28, 8, "IS", "1"), el(0x28, 0x10, "US", us(side)), el(0x28, 0x11, "US", us(side)),
        el(0x28, 0x100, "US", us(8)), el(0x28, 0x101, "US", us(8)), el(0x28, 0x102, "US", us(7)),
        el(0x28, 0x103, "US", us(0)), el(0x48, 6, "UL", ul(side)), el(0x48, 7, "UL", ul(side)),
        el(0x7FE0, 0x10, "OB", bytes(side * side * 3)),
    ]
    path.write_bytes(b"\0" * 128 + b"DICM" + el(2, 0, "UL", ul(len(meta))) + meta
                     + b"".join(body))


def demo_in_new_process(stage: str, workdir) -> dict:
    """`care-scale train <stage> --demo` as a user runs it (own process, own local Ray),
    bounded in time; returns its JSON line."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "care_scale", "train", stage, "--demo",
                           "--workdir", str(workdir), "--set", "run.checkpoint_every=1000"],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])


# The TCP listeners of every process below this one: source text for a child script (it
# runs in the child, so Ray's processes are its descendants). LOOPBACK: what they may be.
LISTENERS = r"""
import json, os, re, subprocess

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

def listeners():
    tree = {os.getpid(), *children(os.getpid())}
    out = []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                               timeout=10).stdout.splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & tree:
            out.append(line.split()[3])
    return out
"""

LOOPBACK = r"(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]):\d+$"
