"""Read warehouse tables into Spark.

With delta-spark on the cluster (its session extension configured) we use ``format("delta")``.
Without it, we ask ``deltalake`` for the table's CURRENT active file list
(``DeltaTable.file_uris()``) and read exactly those Parquet files: files removed by a MERGE,
overwrite or optimize (and not yet vacuumed) are never read, unlike ``spark.read.parquet(dir)``.
The warehouse writes no deletion vectors and no column mapping, so the file list is the table.

S3: Spark reads ``s3a://``; pass ``storage_options`` and we set the ``fs.s3a.*`` keys (keys,
endpoint, path-style access, SSL) on the session's Hadoop configuration; the hadoop-aws jar
must be on the cluster (``spark.jars.packages=org.apache.hadoop:hadoop-aws:<hadoop version>``).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from care_scale.exceptions import TableError
from care_scale.storage import is_remote, redact, to_delta
from care_scale.warehouse import Warehouse


def has_delta_spark(spark: Any) -> bool:
    """Whether the session was configured with delta-spark's extension/catalog."""
    conf = spark.conf
    ext = conf.get("spark.sql.extensions", "") or ""
    cat = conf.get("spark.sql.catalog.spark_catalog", "") or ""
    return "DeltaSparkSessionExtension" in ext or "DeltaCatalog" in cat


def _configure_s3a(spark: Any, opts: dict[str, str]) -> None:
    hconf = spark.sparkContext._jsc.hadoopConfiguration()
    for key, hk in (("aws_access_key_id", "fs.s3a.access.key"),
                    ("aws_secret_access_key", "fs.s3a.secret.key"),
                    ("aws_session_token", "fs.s3a.session.token"),
                    ("aws_region", "fs.s3a.endpoint.region")):
        if opts.get(key):
            hconf.set(hk, opts[key])
    if opts.get("aws_endpoint_url"):
        u = urlsplit(opts["aws_endpoint_url"])
        hconf.set("fs.s3a.endpoint", opts["aws_endpoint_url"])
        hconf.set("fs.s3a.path.style.access", "true")
        hconf.set("fs.s3a.connection.ssl.enabled", "false" if u.scheme == "http" else "true")


def _s3a(uri: str) -> str:
    return "s3a://" + uri.split("://", 1)[1] if uri.startswith("s3://") else uri


def read_table(spark: Any, warehouse: str, table: str, *,
               storage_options: dict[str, Any] | None = None,
               mode: Literal["auto", "delta", "files"] = "auto") -> Any:
    """``table`` of ``warehouse`` as a Spark DataFrame (current version only)."""
    wh = Warehouse(str(warehouse), storage_options=storage_options)
    uri = wh.table_uri(table)
    if is_remote(uri) and storage_options:
        _configure_s3a(spark, to_delta(storage_options, uri))
    if mode == "delta" or (mode == "auto" and has_delta_spark(spark)):
        return spark.read.format("delta").load(_s3a(uri))
    dt = wh.open(table)  # also checks the schema version
    if dt is None:
        raise TableError(table, f"no table at {redact(uri)}")
    files = [_s3a(f) for f in dt.file_uris()]
    if not files:
        return spark.createDataFrame(dt.schema().to_arrow().empty_table())
    return spark.read.parquet(*files)
