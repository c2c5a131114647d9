"""DuckDB over the warehouse: every existing table registered as a view via ``delta_scan``.

Extensions are LOADed from the pip packages ``duckdb_extension_delta`` and
``duckdb_extension_httpfs`` (never INSTALLed from the network, so air-gapped clusters work).
S3 credentials become a DuckDB SECRET built from the same storage options the job uses, or
from the standard AWS environment variables where no option is given (as for the job).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from care_scale.exceptions import ConfigError, StorageError, TableError
from care_scale.storage import is_remote, join, redact, to_delta
from care_scale.warehouse import TABLES, Warehouse


def _extension_file(package: str, name: str) -> str:
    try:
        mod = importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(f"DuckDB extension package {package} is not installed "
                          f"(pip install {package.replace('_', '-')})") from exc
    import duckdb

    root = Path(mod.__file__).parent / "extensions"
    found = sorted(root.glob(f"*/{name}.duckdb_extension"))
    want = [p for p in found if p.parent.name == f"v{duckdb.__version__}"]
    if not (want or found):
        raise ConfigError(f"no {name}.duckdb_extension inside {root}")
    return str((want or found)[-1])


def _q(s: str) -> str:
    return "'" + str(s).replace("'", "''") + "'"


#: Storage option -> the standard AWS environment variables that stand in for it (as they
#: do for the job, whose object_store and s3fs clients read them too).
_AWS_ENV = {
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID",),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "aws_session_token": ("AWS_SESSION_TOKEN",),
    "aws_region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "aws_endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
}


def s3_settings(opts: dict[str, str]) -> dict[str, str]:
    """The S3 settings a query uses: the storage options, else the AWS environment; the
    region defaults to us-east-1 (an empty one made DuckDB dial ``s3..amazonaws.com``)."""
    out = dict(opts)
    for key, names in _AWS_ENV.items():
        if not out.get(key):
            value = next((os.environ[n] for n in names if os.environ.get(n)), None)
            if value:
                out[key] = value
    out.setdefault("aws_region", "us-east-1")
    return out


def _s3_secret(con: Any, opts: dict[str, str]) -> None:
    opts = s3_settings(opts)
    parts = ["TYPE s3", "PROVIDER config"]
    for key, dk in (("aws_access_key_id", "KEY_ID"), ("aws_secret_access_key", "SECRET"),
                    ("aws_session_token", "SESSION_TOKEN"), ("aws_region", "REGION")):
        if opts.get(key):
            parts.append(f"{dk} {_q(opts[key])}")
    endpoint = opts.get("aws_endpoint_url")
    if endpoint:
        u = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        # S3-compatible servers (MinIO, moto) serve buckets by path, often over plain http.
        parts += [f"ENDPOINT {_q(u.netloc)}", "URL_STYLE 'path'",
                  f"USE_SSL {'false' if u.scheme == 'http' else 'true'}"]
    con.execute(f"CREATE OR REPLACE SECRET care_scale_s3 ({', '.join(parts)})")


def connect_duckdb(warehouse: str, *, storage_options: dict[str, Any] | None = None,
                   database: str = ":memory:") -> Any:
    """A DuckDB connection with a view per existing warehouse table (``slides``, ...)."""
    import duckdb
    from deltalake.exceptions import DeltaError

    con = duckdb.connect(database)
    con.execute(f"LOAD {_q(_extension_file('duckdb_extension_httpfs', 'httpfs'))}")
    con.execute(f"LOAD {_q(_extension_file('duckdb_extension_delta', 'delta'))}")
    if is_remote(str(warehouse)):
        _s3_secret(con, to_delta(storage_options, join(str(warehouse), "slides")))
    wh = Warehouse(str(warehouse), storage_options=storage_options)
    for name in TABLES:
        uri = wh.table_uri(name)
        try:
            if wh.open(name) is None:  # also checks the schema version
                continue
            if not is_remote(uri):
                uri = str(Path(uri).resolve())
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM delta_scan({_q(uri)})")
        except StorageError:
            con.close()
            raise  # already one line naming the table and what to check
        except (OSError, duckdb.Error, DeltaError) as exc:
            # Unreachable storage, refused credentials: one line naming the table.
            con.close()
            raise TableError(name, f"{redact(uri)}: {redact(exc)}") from exc
    return con


def sql(warehouse: str, query: str, *, storage_options: dict[str, Any] | None = None) -> Any:
    """Run ``query`` over the warehouse views; returns a ``pyarrow.Table``."""
    import duckdb

    con = connect_duckdb(warehouse, storage_options=storage_options)
    try:
        return con.sql(query).to_arrow_table()
    except duckdb.Error as exc:
        raise TableError("sql", f"{redact(warehouse)}: {redact(exc)}") from exc
    finally:
        con.close()
