"""Annotations in: QuPath / GeoJSON files restricting tiling, recorded in the slides row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from care_scale.annotations import annotation_uri, read_annotations
from care_scale.config import load_config
from care_scale.embed import EmbedConfig
from care_scale.embed.pipeline import job_model_version
from care_scale.embed.sources import read_manifest
from care_scale.exceptions import AnnotationError
from care_scale.slides import open_slide
from care_scale.synthetic import write_synthetic_slide
from care_scale.tiling import tile_grid

TUMOUR = [[200, 200], [2600, 300], [2400, 1900], [300, 1700], [200, 200]]
PEN = [[1000, 0], [1500, 0], [1500, 2048], [1000, 2048], [1000, 0]]


def _qupath(features):
    return {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": f"00000000-0000-4000-8000-00000000000{i}",
         "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation",
                        "classification": {"name": cls, "color": [200, 0, 0]}}}
        for i, (cls, ring) in enumerate(features)]}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    root = tmp_path_factory.mktemp("ann")
    return write_synthetic_slide(root / "s0.tif", width=3072, height=2048, mpp=0.5, seed=2)


def test_annotations_keep_exactly_the_tiles_inside(slide, tmp_path):
    path = tmp_path / "s0.geojson"
    path.write_text(json.dumps(_qupath([("Tumor", TUMOUR), ("Pen", PEN)])))
    with open_slide(str(slide.path)) as s:
        grid = tile_grid(s, target_mpp=0.5, patch_size=128, min_tissue_fraction=0.5)
    ann = read_annotations(str(path), exclude_classes=["Pen"])
    assert (ann.n_include, ann.n_exclude) == (1, 1)
    kept = ann.restrict(grid)
    half = grid.patch_size_level0 / 2
    centres = grid.coords + half
    tumour, pen = shapely.Polygon(TUMOUR), shapely.Polygon(PEN)
    expected = [bool(tumour.contains(shapely.Point(c)) and not pen.contains(shapely.Point(c)))
                for c in centres]
    assert 0 < len(kept) == sum(expected) < len(grid)
    assert {tuple(c) for c in kept.coords.tolist()} == {
        tuple(c) for c, e in zip(grid.coords.tolist(), expected) if e}
    assert len(kept.tissue_fraction) == len(kept.coords)
    # Without the exclusion, the pen strip is tiled too.
    assert len(read_annotations(str(path)).restrict(grid)) > len(kept)
    rec = ann.record(len(grid), len(kept), ["Pen"])
    assert rec["annotations"] == str(path) and rec["annotations_tiles"].startswith(f"{len(kept)} of")


def test_only_exclusions_tile_the_rest_and_bare_lists_are_read(slide, tmp_path):
    path = tmp_path / "pen.json"
    # QuPath without "FEATURE_COLLECTION": a bare list of Features.
    path.write_text(json.dumps(_qupath([("Pen", PEN)])["features"]))
    with open_slide(str(slide.path)) as s:
        grid = tile_grid(s, target_mpp=0.5, patch_size=128)
    kept = read_annotations(str(path), exclude_classes=["Pen"]).restrict(grid)
    inside_pen = [shapely.Polygon(PEN).contains(shapely.Point(c))
                  for c in grid.coords + grid.patch_size_level0 / 2]
    assert len(kept) == len(grid) - sum(inside_pen) and sum(inside_pen) > 0


def test_bad_annotation_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.geojson"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.geojson: cannot be read as JSON"):
        read_annotations(str(bad))
    pts = tmp_path / "points.geojson"
    pts.write_text(json.dumps({"type": "Feature", "geometry": {"type": "Point",
                                                               "coordinates": [1, 2]}}))
    with pytest.raises(AnnotationError, match="points.geojson: has no Polygon"):
        read_annotations(str(pts))
    with pytest.raises(AnnotationError, match="missing.geojson: no such file"):
        read_annotations(str(tmp_path / "missing.geojson"))


def test_where_a_slides_file_comes_from(tmp_path):
    (tmp_path / "a.geojson").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    assert annotation_uri("a", None, str(tmp_path)) == f"{tmp_path}/a.geojson"
    assert annotation_uri("b", None, str(tmp_path)) == f"{tmp_path}/b.json"
    assert annotation_uri("c", None, str(tmp_path)) is None
    assert annotation_uri("a", "/x/given.geojson", str(tmp_path)) == "/x/given.geojson"
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,annotations,site\nslides/a.svs,ann/a.geojson,oslo\n"
                        "slides/b.svs,,bergen\n")
    rows = {s.slide_id: s for s in read_manifest(str(manifest))}
    assert rows["a"].annotations == str(tmp_path / "ann" / "a.geojson")
    assert rows["b"].annotations is None
    assert rows["a"].metadata == {"site": "oslo"}  # not carried twice


def test_annotations_are_part_of_the_model_version():
    plain = load_config(EmbedConfig, None, {"source": "s", "warehouse": "w"})
    ann = load_config(EmbedConfig, None, {"source": "s", "warehouse": "w",
                                          "annotations": {"dir": "/ann"}})
    pen = load_config(EmbedConfig, None, {"source": "s", "warehouse": "w",
                                          "annotations": {"dir": "/ann",
                                                          "exclude_classes": ["Pen"]}})
    versions = {job_model_version(c, "care", "vit") for c in (plain, ann, pen)}
    assert len(versions) == 3


def test_job_tiles_inside_the_annotations_and_records_them(ray_local, slide, tmp_path):
    from care_scale.embed import run_embedding
    from care_scale.warehouse import Warehouse

    ann_dir = tmp_path / "ann"
    ann_dir.mkdir()
    (ann_dir / "s0.geojson").write_text(json.dumps(_qupath([("Tumor", TUMOUR),
                                                            ("Pen", PEN)])))
    write_synthetic_slide(tmp_path / "cohort" / "s1.tif", width=2048, height=1536, mpp=0.5,
                          seed=4)
    (tmp_path / "cohort" / "s0.tif").symlink_to(slide.path)
    cfg = load_config(EmbedConfig, None, {
        "source": str(tmp_path / "cohort"), "warehouse": str(tmp_path / "wh"),
        "keep_patches": True, "progress": "none", "decode_batch_size": 16,
        "encode_batch_size": 16, "concurrency": {"decode_tasks": 1, "encoder_actors": 1},
        "annotations": {"dir": str(ann_dir), "exclude_classes": ["Pen"]}})
    summary = run_embedding(cfg)
    assert summary.done == 2 and summary.failed == 0
    wh = Warehouse(str(tmp_path / "wh"))
    slides = {r["slide_id"]: r for r in wh.read("slides").to_pylist()}
    meta = dict(slides["s0"]["metadata"])
    assert meta["annotations"] == str(ann_dir / "s0.geojson")
    assert meta["annotations_areas"] == "1 to tile, 1 left out (Pen)"
    assert "annotations" not in dict(slides["s1"]["metadata"])  # no file: tiled as usual
    p = wh.read("patches").to_pylist()
    centres = np.array([(r["x"] + r["patch_size_level0"] / 2, r["y"] + r["patch_size_level0"]
                         / 2) for r in p if r["slide_id"] == "s0"])
    assert len(centres) == slides["s0"]["num_patches"] > 0
    assert shapely.contains_xy(shapely.Polygon(TUMOUR), centres[:, 0], centres[:, 1]).all()
    assert not shapely.contains_xy(shapely.Polygon(PEN), centres[:, 0], centres[:, 1]).any()
    assert meta["annotations_tiles"].startswith(f"{len(centres)} of ")
