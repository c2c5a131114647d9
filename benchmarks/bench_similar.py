"""Nearest regions at 1M rows: DuckDB's array functions over the Delta table vs. a vector index.

    python benchmarks/bench_similar.py                      # 1M regions x 512, 20k slides
    python benchmarks/bench_similar.py --rows 200000 --dim 128
    python benchmarks/bench_similar.py --vss /path/to/vss.duckdb_extension   # + HNSW index

The tables are generated directly with deltalake (real schemas, ``--regions-per-slide`` rows
per slide, random unit-scale embeddings), not through the job. Timed, each the median of
``--repeats`` queries for random query slides:

- ``similar(level="region")``: the helper as users call it (connect, register the views, one
  ``list_cosine_similarity`` scan with ORDER BY ... LIMIT 10, joined with ``slides``);
- the same scan alone on an open connection, with ``list_cosine_similarity`` on the
  ``FLOAT[]`` lists and with ``array_cosine_similarity`` after a cast to ``FLOAT[dim]``;
- numpy brute force on the matrix held in memory (after loading it once, also timed);
- with ``--vss FILE`` (the ``vss`` extension file, e.g. from the ``duckdb-extension-vss``
  wheel, which care-scale does not depend on): copying the regions into a DuckDB table,
  building an HNSW index (cosine), its query time and recall@10 against the exact answer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(wh_uri: str, *, rows: int, dim: int, per_slide: int, chunk: int, seed: int):
    import pyarrow as pa
    from deltalake import write_deltalake

    from care_scale.warehouse import Warehouse
    from care_scale.warehouse import schemas as S

    wh = Warehouse(wh_uri)
    if wh.open("regions") is not None:
        return wh
    rng = np.random.default_rng(seed)
    n_slides = rows // per_slide
    wh._create("slides", S.slides_schema(dim))
    wh._create("regions", S.regions_schema(dim))
    schema = S.slides_schema(dim)
    emb = rng.standard_normal((n_slides, dim), dtype=np.float32)
    cols = {f.name: pa.nulls(n_slides, f.type) for f in schema}
    cols.update(slide_id=pa.array([f"slide_{i:06d}" for i in range(n_slides)]),
                model_version=pa.array(["bench"] * n_slides),
                num_patches=pa.array(np.full(n_slides, 1000)),
                num_regions=pa.array(np.full(n_slides, per_slide)),
                roi_region_id=pa.array(np.zeros(n_slides, np.int64)),
                cohort=pa.array(["bench"] * n_slides),
                slide_embedding=pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim),
                roi_embedding=pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), dim))
    write_deltalake(wh.table_uri("slides"), pa.table(cols, schema=schema), mode="append")
    rschema = S.regions_schema(dim)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        idx = np.arange(start, start + n)
        e = rng.standard_normal((n, dim), dtype=np.float32)
        cols = {f.name: pa.nulls(n, f.type) for f in rschema}
        cols.update(slide_id=pa.array([f"slide_{i // per_slide:06d}" for i in idx]),
                    model_version=pa.array(["bench"] * n),
                    region_id=pa.array(idx % per_slide), num_patches=pa.array(np.full(n, 20)),
                    is_roi=pa.array(idx % per_slide == 0),
                    embedding=pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), dim))
        write_deltalake(wh.table_uri("regions"), pa.table(cols, schema=rschema), mode="append")
    return wh


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--regions-per-slide", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warehouse", default=None, help="reuse/generate here (default: a temp dir)")
    ap.add_argument("--vss", default=None, help="vss.duckdb_extension file: also time HNSW")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from care_scale.query import connect_duckdb, similar

    root = args.warehouse or str(Path(tempfile.mkdtemp(prefix="bench_similar_")) / "wh")
    t = time.perf_counter()
    generate(root, rows=args.rows, dim=args.dim, per_slide=args.regions_per_slide,
             chunk=args.chunk, seed=0)
    res: dict[str, object] = {"rows": args.rows, "dim": args.dim, "warehouse": root,
                              "generate_s": round(time.perf_counter() - t, 1)}
    rng = np.random.default_rng(1)
    n_slides = args.rows // args.regions_per_slide
    queries = [f"slide_{i:06d}" for i in rng.integers(0, n_slides, args.repeats)]
    it = iter(queries * 10)

    res["similar_helper_s"], top = timed(
        lambda: similar(root, next(it), k=10, level="region"), args.repeats)
    con = connect_duckdb(root)
    con.execute(f"SET threads = {args.threads}")
    q = con.execute("SELECT embedding FROM regions WHERE slide_id = ? AND region_id = 0",
                    [queries[0]]).fetchone()[0]
    list_sql = ("SELECT slide_id, region_id, list_cosine_similarity(embedding, ?::FLOAT[]) AS s "
                "FROM regions ORDER BY s DESC LIMIT 10")
    array_sql = (f"SELECT slide_id, region_id, array_cosine_similarity(embedding::FLOAT[{args.dim}],"
                 f" ?::FLOAT[{args.dim}]) AS s FROM regions ORDER BY s DESC LIMIT 10")
    res["scan_list_cosine_s"], exact = timed(lambda: con.execute(list_sql, [q]).fetchall(),
                                             args.repeats)
    res["scan_array_cosine_s"], exact2 = timed(lambda: con.execute(array_sql, [q]).fetchall(),
                                               args.repeats)
    assert [r[:2] for r in exact] == [r[:2] for r in exact2]

    t = time.perf_counter()
    tab = con.execute("SELECT embedding FROM regions").to_arrow_table()
    col = tab.column(0).combine_chunks()
    mat = col.flatten().to_numpy().reshape(len(col), -1)
    mat = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    res["numpy_load_s"] = round(time.perf_counter() - t, 2)
    qv = np.asarray(q, np.float32) / np.linalg.norm(q)
    res["numpy_topk_s"], _ = timed(lambda: np.argpartition(-(mat @ qv), 10)[:10], args.repeats)
    mat = tab = col = None  # free the copy before the index build

    if args.vss:
        con.execute(f"LOAD '{args.vss}'")
        t = time.perf_counter()
        con.execute(f"CREATE TABLE reg AS SELECT slide_id, region_id, "
                    f"embedding::FLOAT[{args.dim}] AS e FROM regions")
        res["hnsw_copy_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        con.execute("CREATE INDEX reg_hnsw ON reg USING HNSW (e) WITH (metric = 'cosine')")
        res["hnsw_build_s"] = round(time.perf_counter() - t, 1)
        hnsw_sql = (f"SELECT slide_id, region_id FROM reg ORDER BY "
                    f"array_cosine_distance(e, ?::FLOAT[{args.dim}]) LIMIT 10")
        plan = con.execute("EXPLAIN " + hnsw_sql, [q]).fetchall()
        res["hnsw_used"] = "HNSW" in str(plan)
        res["hnsw_query_s"], approx = timed(lambda: con.execute(hnsw_sql, [q]).fetchall(),
                                            args.repeats)
        res["hnsw_recall_at_10"] = len({r[:2] for r in exact} & {r[:2] for r in approx}) / 10
    for k, v in list(res.items()):
        if isinstance(v, float):
            res[k] = round(v, 3)
    res["helper_top1_similarity"] = round(float(top.column("similarity")[0].as_py()), 4)
    json.dump(res, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
