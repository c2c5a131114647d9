"""Typed input the embedding job hands to :class:`~care_scale.warehouse.Warehouse`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class SlideResult:
    """Everything one finished slide writes.

    ``slide``: one ``slides`` row as a dict (column names of ``slides_schema``; vectors as
    numpy, ``embedded_at`` epoch seconds, ``metadata`` a dict); ``regions``: one dict per
    region (``regions_schema`` columns without slide_id/model_version/run_id, filled from the
    slide); ``patches``: column name -> array (``feature`` (N,D)), or None when not kept.
    """

    slide: dict[str, Any]
    regions: list[dict[str, Any]] = field(default_factory=list)
    patches: dict[str, np.ndarray] | None = None

    @property
    def slide_id(self) -> str:
        return str(self.slide["slide_id"])

    @property
    def model_version(self) -> str:
        return str(self.slide["model_version"])


@dataclass
class FailureRow:
    """One slide that could not be embedded, and why."""

    slide_id: str
    uri: str
    run_id: str
    stage: str
    error_type: str
    message: str
    model_version: str | None = None
    failed_at: float = field(default_factory=time.time)
