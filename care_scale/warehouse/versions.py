"""Which model version a reader of the tables works on.

A warehouse holds rows of every model version that embedded into it (one row per slide x
model version). Probes, similarity search and feature export compare embeddings, which only
makes sense within one version: with several present the caller must choose, and the error
lists them so the choice is one copy-paste away.
"""

from __future__ import annotations

from collections.abc import Iterable

from care_scale.exceptions import TableError


def pick_model_version(found: Iterable[str], chosen: str | None, *, table: str) -> str:
    """``chosen`` if ``table`` holds it, else the only version there; errors name them all."""
    versions = sorted({str(v) for v in found if v is not None})
    if not versions:
        raise TableError(table, "has no rows")
    if chosen is not None:
        if chosen not in versions:
            raise TableError(table, f"has no rows of model version {chosen!r}; it has "
                                    f"{', '.join(versions)}")
        return chosen
    if len(versions) > 1:
        raise TableError(table, f"holds {len(versions)} model versions ({', '.join(versions)}); "
                                "choose one with --model-version")
    return versions[0]
