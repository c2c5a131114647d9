"""Arrow schemas of the warehouse tables and their version.

Embedding widths depend on the model, so the three embedding tables are built per width
(``slides_schema(dim)``...); the first write fixes the width of a table. Embeddings are
fixed-size float32 lists. Manifest metadata is carried two ways:
``metadata`` map<string,string> (queryable: ``metadata['site']`` in DuckDB/Spark; all values as
strings, so heterogeneous manifests never break the schema) plus ``metadata_json`` (lossless),
and the common ``cohort`` column is promoted to a real column.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
VERSION_KEY = "care_scale.schema_version"
# probes: results of `care-scale probe` (appended, one row per probe run; see PROBES_SCHEMA).
TABLES = ("slides", "regions", "patches", "failures", "runs", "probes")
# Merge keys: one row per key and model version (exactly once).
KEYS = {
    "slides": ("slide_id", "model_version"),
    "regions": ("slide_id", "model_version", "region_id"),
    "patches": ("slide_id", "model_version", "x", "y"),
    "failures": ("slide_id", "run_id", "stage"),
    "runs": ("run_id",),
    "probes": ("probe_id",),
}
TS = pa.timestamp("us", tz="UTC")


def embedding(dim: int) -> pa.DataType:
    return pa.list_(pa.field("element", pa.float32()), int(dim))


def slides_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("slide_id", pa.string()), ("model_version", pa.string()),
        ("source_uri", pa.string()), ("source_size", pa.int64()), ("source_etag", pa.string()),
        ("width", pa.int64()), ("height", pa.int64()), ("mpp", pa.float64()),
        ("mpp_source", pa.string()), ("target_mpp", pa.float64()), ("patch_size", pa.int64()),
        ("patch_size_level0", pa.int64()), ("num_patches", pa.int64()),
        ("num_regions", pa.int64()), ("slide_embedding", embedding(dim)),
        ("roi_region_id", pa.int64()), ("roi_embedding", embedding(dim)),
        ("slide_encoder_version", pa.string()), ("patch_encoder_version", pa.string()),
        ("backend", pa.string()), ("slide_backend", pa.string()), ("run_id", pa.string()),
        ("cohort", pa.string()), ("metadata", pa.map_(pa.string(), pa.string())),
        ("metadata_json", pa.string()), ("embedded_at", TS),
    ])


def regions_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("slide_id", pa.string()), ("model_version", pa.string()), ("region_id", pa.int64()),
        ("num_patches", pa.int64()), ("coverage", pa.float32()),
        ("semantic_weight", pa.float32()), ("fused_weight", pa.float32()),
        ("is_roi", pa.bool_()), ("bbox_x0", pa.int64()), ("bbox_y0", pa.int64()),
        ("bbox_x1", pa.int64()), ("bbox_y1", pa.int64()), ("geometry", pa.string()),
        ("embedding", embedding(dim)), ("run_id", pa.string()),
    ])


def patches_schema(dim: int) -> pa.Schema:
    return pa.schema([
        ("slide_id", pa.string()), ("model_version", pa.string()), ("x", pa.int64()),
        ("y", pa.int64()), ("patch_size_level0", pa.int64()), ("region_id", pa.int64()),
        ("tissue_fraction", pa.float32()), ("feature", embedding(dim)),
    ])


FAILURES_SCHEMA = pa.schema([
    ("slide_id", pa.string()), ("uri", pa.string()), ("run_id", pa.string()),
    ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
    ("model_version", pa.string()), ("failed_at", TS),
])

RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("config_json", pa.string()), ("started_at", TS),
    ("finished_at", TS), ("counts_json", pa.string()),
])

#: One row per ``care-scale probe`` run. The headline metrics are columns (mean, std over
#: folds, bootstrap 95% interval), so SQL can rank probes; ``metrics_json`` has every fold and
#: ``config_json`` everything needed to run the same probe again.
_METRICS = ("balanced_accuracy", "auroc", "weighted_f1", "c_index")  # c_index: survival
PROBES_SCHEMA = pa.schema(
    [("probe_id", pa.string()), ("model_version", pa.string()), ("target", pa.string()),
     ("feature", pa.string()), ("model", pa.string()), ("unit", pa.string()),
     ("labels_uri", pa.string()), ("splits", pa.string()), ("num_samples", pa.int64()),
     ("num_classes", pa.int64()), ("num_folds", pa.int64())]
    + [(f"{m}_{s}", pa.float64()) for m in _METRICS for s in ("mean", "std", "ci_low",
                                                               "ci_high")]
    + [("metrics_json", pa.string()), ("config_json", pa.string()), ("created_at", TS)])
