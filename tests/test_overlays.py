"""Overlays of the CARE regions: QuPath GeoJSON, the pictures, ``care-scale show``.

Real slides (a generated one whose tissue map is known, and CMU-1-Small-Region.svs), embedded
by the job's own steps without Ray (``overlay_slides.embed_one``), real Delta tables.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import shapely
from overlay_slides import embed_one
from PIL import Image

from care_scale.cli import main
from care_scale.overlays.colors import adjacency, region_colours
from care_scale.overlays.geojson import regions_geojson, tissue_geojson
from care_scale.overlays.render import FILL_ALPHA, canvas, render_heatmap, render_regions
from care_scale.overlays.shapes import shapes_from_rows
from care_scale.overlays.show import slide_rows
from care_scale.slides import open_slide
from care_scale.synthetic import write_synthetic_slide
from care_scale.tissue import detect_tissue
from care_scale.warehouse import Warehouse

DATA = Path(__file__).parent / "data"
QUPATH_EXAMPLE = DATA / "qupath" / "qupath_export.geojson"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A warehouse with a generated slide (known tissue map) and the real CMU-1 region."""
    root = tmp_path_factory.mktemp("overlays")
    syn = write_synthetic_slide(root / "syn.tif", width=4608, height=3072, mpp=0.5, seed=3)
    wh = str(root / "wh")
    embed_one(str(syn.path), wh, "syn")
    embed_one(str(DATA / "CMU-1-Small-Region.svs"), wh, "cmu1")
    # TRIDENT's grid (its own origin and step from the objective power, not 224 from 0).
    embed_one(str(DATA / "CMU-1-Small-Region.svs"), wh, "cmu1_trident", mode="trident")
    return {"wh": wh, "syn": syn, "root": root}


def _shapes(wh: str, sid: str, *, from_patches: bool):
    slide, regions, patches = slide_rows(Warehouse(wh), sid, None)
    shapes = shapes_from_rows(slide, regions, patches=patches if from_patches else None)
    return shapes, patches


def _squares(xy: np.ndarray, step: int):
    return [shapely.box(x, y, x + step, y + step) for x, y in xy]


# -- GeoJSON ---------------------------------------------------------------------------------


def _structure(value):
    """Member names and value types, recursively (lists: the union of their items')."""
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, list):
        return ["list", sorted({json.dumps(_structure(v), sort_keys=True) for v in value})]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _qupath_example() -> dict:
    """The members of the example's Features (all of them together)."""
    doc = json.loads(QUPATH_EXAMPLE.read_text())
    assert doc["type"] == "FeatureCollection"
    out: dict = {"properties": {}}
    for f in doc["features"]:
        out.update({k: v for k, v in f.items() if k != "properties"})
        out["properties"].update(f["properties"])
    return out


def _assert_like_qupath(feature: dict, example: dict) -> None:
    """Every member we write is one QuPath writes, nested the same way, of the same type."""
    assert set(feature) <= set(example) and feature["type"] == "Feature"
    uuid.UUID(feature["id"])  # QuPath reads ids as UUIDs
    assert feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    props, ex = feature["properties"], example["properties"]
    extra = set(props) - set(ex) - {"tissue_id"}  # TRIDENT's member on tissue features
    assert not extra, f"members QuPath does not write: {extra}"
    assert props["objectType"] == ex["objectType"] == "annotation"
    for key in ("classification", "color", "name"):
        assert _structure(props[key]) == _structure(ex[key]), key
    assert set(props["classification"]) == {"name", "color"}  # both, or QuPath rejects it
    assert all(isinstance(v, (int, float)) and np.isfinite(v)
               for v in props["measurements"].values())
    assert all(isinstance(v, str) for v in props.get("metadata", {}).values())


def test_regions_geojson_is_quPath_format_and_valid(embedded):
    example = _qupath_example()
    for sid in ("syn", "cmu1"):
        shapes, _ = _shapes(embedded["wh"], sid, from_patches=False)
        doc = json.loads(json.dumps(regions_geojson(shapes), allow_nan=False))
        assert set(doc) == {"type", "features"} and doc["type"] == "FeatureCollection"
        feats = doc["features"]
        assert len(feats) == len(shapes.regions) and len({f["id"] for f in feats}) == len(feats)
        for f in feats:
            _assert_like_qupath(f, example)
            g = shapely.geometry.shape(f["geometry"])
            assert g.is_valid and g.area > 0
        rois = [f for f in feats if f["properties"]["classification"]["name"] == "CARE ROI"]
        assert len(rois) == 1 and rois[0]["properties"]["measurements"]["is_roi"] == 1
        m = {f["properties"]["measurements"]["region_id"]: f["properties"]["measurements"]
             for f in feats}
        for r in shapes.regions:
            assert m[r.region_id]["num_patches"] == r.num_patches == len(r.cells)
            assert m[r.region_id]["fused_weight"] == pytest.approx(r.fused_weight)
        # Stable ids: the same slide, model version and region give the same UUID.
        assert [f["id"] for f in regions_geojson(shapes)["features"]] == [f["id"] for f in feats]


def test_region_outlines_are_exactly_their_patch_squares(embedded):
    for sid in ("syn", "cmu1", "cmu1_trident"):
        shapes, patches = _shapes(embedded["wh"], sid, from_patches=False)
        xy = np.stack([patches["x"], patches["y"]], 1)
        step = shapes.step
        assert step == int(np.diff(np.unique(xy[:, 0])).min())
        union = shapely.union_all([r.geometry for r in shapes.regions])
        squares = shapely.union_all(_squares(xy, step))
        assert union.covers(squares) and squares.covers(union)
        for r in shapes.regions:
            own = xy[patches["region_id"] == r.region_id]
            # Cells recovered from the outline alone are the region's patches.
            assert {tuple(c) for c in r.cells.tolist()} == {tuple(c) for c in own.tolist()}
            assert r.geometry.is_valid
            assert r.geometry.symmetric_difference(
                shapely.union_all(_squares(own, step))).area == 0
        total = sum(r.geometry.area for r in shapes.regions)
        assert total == pytest.approx(union.area)  # regions do not overlap


def test_tissue_geojson_is_valid_and_matches_the_known_tissue(embedded):
    syn = embedded["syn"]
    with open_slide(str(syn.path)) as slide:
        contours = detect_tissue(slide).contours
    doc = tissue_geojson("syn", contours)
    example = _qupath_example()
    polys = []
    for i, f in enumerate(doc["features"]):
        assert f["properties"]["tissue_id"] == i  # TRIDENT's property
        _assert_like_qupath(f, example)
        g = shapely.geometry.shape(f["geometry"])
        assert f["geometry"]["type"] == "Polygon" and g.is_valid
        polys.append(g)
    found = shapely.union_all(polys)
    # Against the generator's own tissue map, cell by cell (cell centres inside the contours).
    ds = syn.type_map_downsample
    gy, gx = np.mgrid[0:syn.type_map.shape[0], 0:syn.type_map.shape[1]]
    inside = shapely.contains_xy(found, (gx.ravel() + 0.5) * ds, (gy.ravel() + 0.5) * ds)
    truth = syn.tissue_mask.ravel()
    iou = (inside & truth).sum() / (inside | truth).sum()
    assert iou > 0.9, iou


# -- pictures --------------------------------------------------------------------------------


def _check_regions_in_picture(shapes, thumb, max_side):
    """At each patch's centre the picture shows that region's colour over the thumbnail."""
    pic = render_regions(thumb, shapes, max_side=max_side)
    img = np.asarray(pic.image).astype(np.float64)
    bg = canvas(thumb, shapes, max_side).rgb.astype(np.float64)
    colours = region_colours({r.region_id: r.cells for r in shapes.regions}, shapes.step)
    pal = np.array(sorted(set(colours.values())), np.float64)
    ox, oy = pic.origin
    hits = total = 0
    for r in shapes.regions:
        own = np.array(colours[r.region_id], np.float64)
        for x, y in r.cells + shapes.step / 2.0:
            # A point a little off the centre, clear of the region's id label.
            cx, cy = int(x * pic.sx + 0.2 * shapes.step * pic.sx), int(y * pic.sy)
            seen = img[oy + cy, ox + cx]
            err = np.abs(bg[cy, cx] * (1 - FILL_ALPHA) + pal * FILL_ALPHA - seen).max(axis=1)
            # The region's own colour explains the pixel, and no other colour does.
            mine = np.all(pal == own, axis=1)
            hits += bool(err[mine][0] <= 2 and err[~mine].min() > 2)
            total += 1
    # Outside every patch and every line, the picture is the thumbnail itself.
    assert np.abs(img[oy + 2, ox + 2] - bg[2, 2]).max() <= 1
    return hits / total, pic


def test_picture_regions_sit_where_their_patches_are(embedded):
    syn = embedded["syn"]
    shapes, _ = _shapes(embedded["wh"], "syn", from_patches=False)
    # The regions' patches lie on the generator's tissue.
    ds = syn.type_map_downsample
    centres = (shapes.patches + shapes.step // 2) // ds
    on_tissue = syn.tissue_mask[centres[:, 1], centres[:, 0]].mean()
    assert on_tissue > 0.95, on_tissue
    with open_slide(str(syn.path)) as slide:
        thumbs = {"thumbnail 1,600": (slide.thumbnail(1600), 1600),
                  "small thumbnail enlarged": (slide.thumbnail(700), 1600),
                  "pyramid level 1, as it is": (slide.read_region(1, 0, 0,
                                                *slide.level_dimensions[1]), None)}
    for what, (thumb, max_side) in thumbs.items():
        share, pic = _check_regions_in_picture(shapes, thumb, max_side)
        assert share > 0.97, (what, share)
        if max_side:
            assert max(pic.image.size) >= max_side  # legible: drawn at full size


def test_neighbouring_regions_have_different_colours(embedded):
    for sid in ("syn", "cmu1"):
        shapes, _ = _shapes(embedded["wh"], sid, from_patches=True)
        cells = {r.region_id: r.cells for r in shapes.regions}
        colours = region_colours(cells, shapes.step)
        adj = adjacency(cells, shapes.step)
        assert sum(len(v) for v in adj.values()) > 0
        assert all(colours[a] != colours[b] for a, ns in adj.items() for b in ns)
    # A dense map: 64 square regions of 2 x 2 patches on a 16 x 16 grid (8 neighbours each,
    # counting diagonals; 4 edge neighbours).
    cells = {}
    for i in range(64):
        gx, gy = (i % 8) * 2, (i // 8) * 2
        cells[i] = np.array([(gx + a, gy + b) for a in (0, 1) for b in (0, 1)]) * 10
    colours = region_colours(cells, 10)
    adj = adjacency(cells, 10)
    assert max(len(v) for v in adj.values()) == 4
    assert all(colours[a] != colours[b] for a, ns in adj.items() for b in ns)


def test_heatmap_colour_follows_the_fused_weight(embedded):
    from care_scale.overlays.colors import colormap
    from care_scale.overlays.render import HEAT_ALPHA

    shapes, _ = _shapes(embedded["wh"], "syn", from_patches=False)
    with open_slide(str(embedded["syn"].path)) as slide:
        thumb = slide.thumbnail(1600)
    pic = render_heatmap(thumb, shapes)
    img = np.asarray(pic.image).astype(np.float64)
    bg = canvas(thumb, shapes, 1600).rgb.astype(np.float64)
    w = np.array([r.fused_weight for r in shapes.regions])
    levels = np.linspace(0, 1, 101)
    ramp = colormap(levels).astype(np.float64)
    for r in (shapes.regions[int(np.argmax(w))], shapes.regions[int(np.argmin(w))]):
        x, y = r.cells[len(r.cells) // 2] + shapes.step // 2
        cx, cy = int(x * pic.sx + 0.2 * shapes.step * pic.sx), int(y * pic.sy)
        seen = img[pic.origin[1] + cy, pic.origin[0] + cx]
        est = levels[int(np.argmin(np.abs(bg[cy, cx] * (1 - HEAT_ALPHA) + ramp * HEAT_ALPHA
                                          - seen).sum(axis=1)))]
        expected = (r.fused_weight - w.min()) / (w.max() - w.min())
        assert abs(est - expected) < 0.08, (r.region_id, est, expected)
    # The colour bar is to the right of the slide.
    assert pic.image.size[0] > bg.shape[1] + 40


# -- care-scale show -------------------------------------------------------------------------


def test_show_writes_pictures_and_geojson(embedded, tmp_path, capsys):
    out = tmp_path / "shown"
    assert main(["show", "cmu1", "--warehouse", embedded["wh"], "--out", str(out)]) == 0
    files = sorted(p.name for p in (out / "cmu1").iterdir())
    assert files == ["heatmap.png", "regions.geojson", "regions.png", "tissue.geojson"]
    with Image.open(out / "cmu1" / "regions.png") as im:
        # CMU-1-Small-Region is portrait (2220 x 2967): 1,600 px tall slide area + header.
        assert im.size[0] == round(2220 * 1600 / 2967) and im.size[1] > 1600
    doc = json.loads((out / "cmu1" / "regions.geojson").read_text())
    shapes, _ = _shapes(embedded["wh"], "cmu1", from_patches=True)
    assert len(doc["features"]) == len(shapes.regions)
    assert "regions.png" in capsys.readouterr().out


def test_show_errors_are_one_line(embedded, tmp_path, capsys):
    code = main(["show", "syn", "--warehouse", embedded["wh"], "--out", str(tmp_path),
                 "--level", "7"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("ConfigError: --level 7:") and "\n" not in err
    code = main(["show", "nope", "--warehouse", embedded["wh"], "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"TableError: slides: no slide 'nope' in {embedded['wh']}"


# -- the job's --overlays --------------------------------------------------------------------


def test_job_overlays_on_s3_match_the_tables(ray_local, tmp_path, s3_options, s3_bucket):
    """``overlays: true`` with slides and warehouse on S3: every embedded slide gets its five
    files under WH/overlays/<slide_id>/, and its GeoJSON says what its regions rows say."""
    import fsspec

    from care_scale.config import load_config
    from care_scale.embed import EmbedConfig, run_embedding
    from care_scale.storage import to_fsspec

    fs = fsspec.filesystem("s3", **to_fsspec(s3_options))
    for i in range(2):
        p = write_synthetic_slide(tmp_path / f"s{i}.tiff", width=2048, height=1536, mpp=0.5,
                                  seed=10 + i).path
        fs.put(str(p), f"{s3_bucket}/cohort/{p.name}")
    wh = f"s3://{s3_bucket}/wh"
    cfg = load_config(EmbedConfig, None, {
        "source": f"s3://{s3_bucket}/cohort/", "warehouse": wh, "overlays": True,
        "progress": "none", "storage_options": s3_options, "decode_batch_size": 16,
        "encode_batch_size": 16, "concurrency": {"decode_tasks": 1, "encoder_actors": 1}})
    summary = run_embedding(cfg)
    assert summary.done == 2 and summary.failed == 0
    whobj = Warehouse(wh, storage_options=s3_options)
    for sid in ("s0", "s1"):
        folder = f"{s3_bucket}/wh/overlays/{sid}"
        assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(folder)) == [
            "heatmap.png", "regions.geojson", "regions.png", "thumbnail.jpg", "tissue.geojson"]
        doc = json.loads(fs.cat(f"{folder}/regions.geojson"))
        _, regions, _ = slide_rows(whobj, sid, None)
        got = {f["properties"]["measurements"]["region_id"]:
               (f["properties"]["measurements"]["num_patches"],
                shapely.geometry.shape(f["geometry"])) for f in doc["features"]}
        assert sorted(got) == sorted(r["region_id"] for r in regions)
        for r in regions:
            n, g = got[r["region_id"]]
            assert n == r["num_patches"] and g.equals(shapely.from_wkt(r["geometry"]))
        with Image.open(fs.open(f"{folder}/regions.png")) as im:
            assert max(im.size) >= 1600
        tissue = json.loads(fs.cat(f"{folder}/tissue.geojson"))
        assert tissue["features"] and all(
            shapely.geometry.shape(f["geometry"]).is_valid for f in tissue["features"])
        # `care-scale show` from the tables and the source slide says the same, byte for byte.
        from care_scale.overlays.show import show_slide

        shown = show_slide(wh, sid, out=str(tmp_path / "shown"), storage_options=s3_options)
        for name in ("regions.geojson", "tissue.geojson"):
            assert Path(shown.files[name]).read_bytes() == fs.cat(f"{folder}/{name}"), name
