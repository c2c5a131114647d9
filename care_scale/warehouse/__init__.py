"""Delta Lake warehouse of the embedding job (see ``writer`` for exactly-once and concurrency)."""

from care_scale.warehouse.files import DataFile
from care_scale.warehouse.rows import FailureRow, SlideResult
from care_scale.warehouse.schemas import SCHEMA_VERSION, TABLES
from care_scale.warehouse.writer import Warehouse

__all__ = ["SCHEMA_VERSION", "TABLES", "DataFile", "FailureRow", "SlideResult", "Warehouse"]
