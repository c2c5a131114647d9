"""Molecular inputs of stage II: RNA and protein tables, slide<->sample mapping, gene lists.

Formats a user brings:

- RNA table: CSV or Parquet, one row per sample, a sample-id column (default ``sample_id``,
  else the first column) and one numeric column per gene (log-expression, or raw counts with
  ``log1p``).
- Protein table: the same layout, one column per protein id (e.g. RPPA abundance).
- Mapping: CSV/Parquet with columns ``slide_id`` and ``sample_id`` (several slides may share
  a sample). Without it, the slide id must equal the sample id.
- Gene list: a text file with one gene per line, or an MSigDB ``.gmt`` file (tab separated:
  set name, description, genes...; the union of all sets is used).
- Protein embeddings: CSV/Parquet, first column the protein id, the rest one vector.

Every inconsistency is a :class:`TrainingDataError` naming the file and giving counts.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from care_scale.exceptions import TrainingDataError
from care_scale.storage import redact, to_fsspec

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MolecularTable:
    """A sample x feature matrix with its names; ``uri`` names the source file."""

    uri: str
    samples: list[str]
    features: list[str]
    values: np.ndarray  # (S, F) float32


def _read_frame(uri: str, storage_options: dict[str, Any] | None) -> Any:
    import fsspec
    import pandas as pd

    uri = str(uri)
    opts = to_fsspec(storage_options, uri)
    try:
        with fsspec.open(uri, "rb", **opts) as fh:
            if uri.lower().endswith((".parquet", ".pq")):
                return pd.read_parquet(fh)
            sep = "\t" if uri.lower().endswith((".tsv", ".txt")) else ","
            return pd.read_csv(fh, sep=sep)
    except FileNotFoundError:
        raise TrainingDataError(f"{redact(uri)}: no such file") from None
    except pd.errors.EmptyDataError:
        raise TrainingDataError(f"{redact(uri)}: the table is empty") from None
    except (ValueError, OSError) as exc:
        raise TrainingDataError(f"{redact(uri)}: cannot be read as a table ({exc})") from None


def table_from_frame(frame: Any, *, uri: str, sample_id_column: str = "sample_id",
                     log1p: bool = False) -> MolecularTable:
    """Validate a pandas frame (sample-id column + numeric columns) into a MolecularTable."""
    import pandas as pd

    where = redact(uri)
    if frame.index.name == sample_id_column and sample_id_column not in frame.columns:
        frame = frame.reset_index()
    if frame.shape[0] == 0 or frame.shape[1] < 2:
        raise TrainingDataError(
            f"{where}: the table is empty ({frame.shape[0]} rows, {frame.shape[1]} columns)")
    id_col = sample_id_column if sample_id_column in frame.columns else frame.columns[0]
    samples = frame[id_col].astype(str).tolist()
    dup = pd.Series(samples)[pd.Series(samples).duplicated()].unique().tolist()
    if dup:
        raise TrainingDataError(
            f"{where}: {len(dup)} duplicated sample id(s) in column {id_col!r}, e.g. {dup[:3]}")
    data = frame.drop(columns=[id_col])
    non_numeric = [c for c in data.columns if not pd.api.types.is_numeric_dtype(data[c])]
    if non_numeric:
        raise TrainingDataError(
            f"{where}: {len(non_numeric)} non-numeric column(s), e.g. {non_numeric[:3]}")
    values = data.to_numpy(dtype=np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        rows = np.nonzero(bad.any(1))[0]
        cols = np.nonzero(bad.any(0))[0]
        raise TrainingDataError(
            f"{where}: {int(bad.sum())} NaN/inf value(s) in {len(rows)} sample(s) and "
            f"{len(cols)} column(s), e.g. sample {samples[rows[0]]!r} column "
            f"{str(data.columns[cols[0]])!r}; impute or drop them before training")
    if log1p:
        if (values < 0).any():
            raise TrainingDataError(f"{where}: log1p asked for, but the table has negative values")
        values = np.log1p(values)
    return MolecularTable(uri=str(uri), samples=samples,
                          features=[str(c) for c in data.columns], values=values)


def read_molecular_table(uri: str, *, sample_id_column: str = "sample_id", log1p: bool = False,
                         storage_options: dict[str, Any] | None = None) -> MolecularTable:
    """Read a sample x feature table (CSV / TSV / Parquet, local or fsspec URI)."""
    frame = _read_frame(uri, storage_options)
    return table_from_frame(frame, uri=uri, sample_id_column=sample_id_column, log1p=log1p)


def read_mapping(uri: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """slide_id -> sample_id from a CSV/Parquet mapping file."""
    frame = _read_frame(uri, storage_options)
    missing = {"slide_id", "sample_id"} - set(frame.columns)
    if missing:
        raise TrainingDataError(
            f"{redact(uri)}: mapping needs columns slide_id and sample_id; missing "
            f"{sorted(missing)} (has {list(frame.columns)[:5]})")
    if len(frame) == 0:
        raise TrainingDataError(f"{redact(uri)}: the mapping is empty")
    dup = frame["slide_id"][frame["slide_id"].duplicated()].astype(str).unique().tolist()
    if dup:
        raise TrainingDataError(
            f"{redact(uri)}: {len(dup)} slide id(s) mapped more than once, e.g. {dup[:3]}")
    return dict(zip(frame["slide_id"].astype(str), frame["sample_id"].astype(str)))


def read_gene_list(uri: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Genes of a plain list (one per line) or of an MSigDB GMT file (union of the sets)."""
    import fsspec

    try:
        with fsspec.open(uri, "r", **to_fsspec(storage_options, uri)) as fh:
            lines = [ln.rstrip("\n") for ln in fh if ln.strip()]
    except FileNotFoundError:
        raise TrainingDataError(f"{redact(uri)}: no such gene-list file") from None
    genes: list[str] = []
    is_gmt = str(uri).lower().endswith(".gmt") or any("\t" in ln for ln in lines)
    for ln in lines:
        # GMT: name <tab> description <tab> gene <tab> gene ...
        parts = [p.strip() for p in ln.split("\t")][2:] if is_gmt else [ln.strip()]
        genes.extend(p for p in parts if p)
    genes = list(dict.fromkeys(genes))  # de-duplicate, keep order
    if not genes:
        raise TrainingDataError(f"{redact(uri)}: the gene list is empty")
    return genes


def select_genes(table: MolecularTable, *, gene_list: list[str] | None = None,
                 gene_list_uri: str = "<gene list>", n_genes: int = 3999,
                 fit_rows: np.ndarray | None = None) -> MolecularTable:
    """The ``n_genes`` most variable genes (in table order), among those of ``gene_list`` when
    one is given (the paper keeps 3,999 of the Hallmark genes). Variance over ``fit_rows``
    (the training samples) only; all rows when None."""
    values = table.values if fit_rows is None else table.values[fit_rows]
    keep = list(range(len(table.features)))
    if gene_list is not None:
        wanted = {g.upper() for g in gene_list}
        keep = [i for i, g in enumerate(table.features) if g.upper() in wanted]
        if not keep:
            raise TrainingDataError(
                f"{redact(gene_list_uri)}: none of its {len(wanted)} genes is a column of "
                f"{redact(table.uri)} ({len(table.features)} genes, e.g. "
                f"{table.features[:3]}); check the gene naming (symbols vs Ensembl ids)")
        log.info("gene list %s: %d of %d genes found in %s", redact(gene_list_uri), len(keep),
                 len(wanted), redact(table.uri))
    if len(keep) > n_genes:
        var = values[:, keep].var(axis=0)
        keep = sorted(keep[i] for i in np.argsort(-var, kind="stable")[:n_genes])
    return MolecularTable(uri=table.uri, samples=table.samples,
                          features=[table.features[i] for i in keep],
                          values=np.ascontiguousarray(table.values[:, keep]))


def top_proteins(table: MolecularTable, n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Indices (S, n) of the ``n`` most abundant proteins of each sample, and their values."""
    if table.values.shape[1] < n:
        raise TrainingDataError(
            f"{redact(table.uri)}: {table.values.shape[1]} proteins, fewer than the {n} "
            "most abundant ones stage II uses")
    idx = np.argsort(-table.values, axis=1, kind="stable")[:, :n]
    return idx.astype(np.int64), np.take_along_axis(table.values, idx, 1)


def read_protein_embeddings(uri: str, proteins: list[str], *,
                            storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """(P, E) float32 rows of a protein-embedding table, in the order of ``proteins``."""
    frame = _read_frame(uri, storage_options)
    if frame.shape[0] == 0 or frame.shape[1] < 2:
        raise TrainingDataError(f"{redact(uri)}: the protein-embedding table is empty")
    ids = frame.iloc[:, 0].astype(str).tolist()
    vectors = frame.iloc[:, 1:].to_numpy(dtype=np.float32)
    index = {p: i for i, p in enumerate(ids)}
    missing = [p for p in proteins if p not in index]
    if missing:
        raise TrainingDataError(
            f"{redact(uri)}: {len(missing)} of {len(proteins)} proteins have no embedding, "
            f"e.g. {missing[:3]}")
    if not np.isfinite(vectors).all():
        raise TrainingDataError(f"{redact(uri)}: NaN/inf values in protein embeddings")
    return vectors[[index[p] for p in proteins]]


def pair_slides(slide_ids: list[str], table: MolecularTable, *,
                mapping: dict[str, str] | None = None, mapping_uri: str | None = None,
                allow_unpaired: bool = False) -> tuple[list[str], list[str]]:
    """Pair slides with table samples. Returns (slide_ids kept, their sample ids).

    Mismatches are reported with counts: slides without a sample (no mapping entry, or a
    mapped sample missing from the table) and samples no slide refers to. They are an error
    unless ``allow_unpaired``, which drops them and logs the counts.
    """
    samples = set(table.samples)
    if mapping is not None:
        no_entry = [s for s in slide_ids if s not in mapping]
        mapped = {s: mapping[s] for s in slide_ids if s in mapping}
    else:
        no_entry = []
        mapped = {s: s for s in slide_ids}
    no_sample = [s for s, m in mapped.items() if m not in samples]
    used = {m for m in mapped.values() if m in samples}
    orphan = [s for s in table.samples if s not in used]
    kept = [s for s in slide_ids if s in mapped and mapped[s] in samples]
    problems = []
    if no_entry:
        problems.append(f"{len(no_entry)} of {len(slide_ids)} slides are not in the mapping "
                        f"{redact(mapping_uri or '')} (e.g. {no_entry[:3]})")
    if no_sample:
        eg = [f"{s}->{mapped[s]}" for s in no_sample[:3]]
        problems.append(f"{len(no_sample)} of {len(slide_ids)} slides have no row in "
                        f"{redact(table.uri)} (e.g. {eg})")
    if orphan:
        problems.append(f"{len(orphan)} of {len(table.samples)} samples of {redact(table.uri)} "
                        f"match no slide (e.g. {orphan[:3]})")
    if not kept:
        raise TrainingDataError(
            f"sample ids of {redact(table.uri)} and the slides do not match at all: "
            + "; ".join(problems))
    if problems:
        msg = "mismatched sample ids: " + "; ".join(problems)
        if not allow_unpaired:
            raise TrainingDataError(
                msg + f"; {len(kept)} slides pair. Fix the ids or set "
                "molecular.allow_unpaired=true to train on the pairs only")
        log.warning("%s; training on the %d paired slides", msg, len(kept))
    return kept, [mapped[s] for s in kept]
