"""Real local PySpark reads warehouse tables through the active-file-list path."""

from __future__ import annotations

import os

import pytest
from factories import fake_result

from care_scale.warehouse import Warehouse

pyspark = pytest.importorskip("pyspark")


@pytest.mark.slow
def test_spark_reads_only_current_files(tmp_path):
    from pyspark.sql import SparkSession

    from care_scale.query.spark import has_delta_spark, read_table

    wh = Warehouse(str(tmp_path / "wh"))
    wh.write_results([fake_result(f"s{i}", seed=i) for i in range(3)])
    # Re-write s0 with other values: the MERGE removes the old files (not vacuumed).
    wh.write_results([fake_result("s0", seed=42)])
    wh.optimize("regions")
    spark = (SparkSession.builder.master("local[1]").appName("care-scale-test")
             .config("spark.ui.enabled", "false")
             .config("spark.sql.shuffle.partitions", "1").getOrCreate())
    try:
        assert not has_delta_spark(spark)
        slides = read_table(spark, wh.uri, "slides")
        assert slides.count() == 3
        assert sorted(r.slide_id for r in slides.select("slide_id").collect()) == [
            "s0", "s1", "s2"]
        emb = slides.where("slide_id = 's0'").select("slide_embedding").first()[0]
        want = fake_result("s0", seed=42).slide["slide_embedding"]
        assert emb == pytest.approx(want.tolist(), abs=1e-6)
        regions = read_table(spark, wh.uri, "regions")
        assert regions.count() == 9
        assert regions.groupBy("slide_id").count().where("count != 3").count() == 0
        # The directory still holds removed files: reading it blindly would be wrong.
        stale = spark.read.parquet(os.path.join(wh.table_uri("regions")))
        assert stale.count() > 9
    finally:
        spark.stop()
