"""``care-scale embed --demo``: the README's first command, end to end in a few minutes.

Generates a small synthetic cohort (real pyramidal TIFF slides with known tissue), embeds it
with the seeded tiny models (``care_tiny`` and its paired ``vit_demo_patch16_112``; random
weights, so the embeddings mean nothing biologically: the point is the machinery) into a
local Delta warehouse with patch features kept, prints the run summary and one DuckDB query.
Running it again reuses the slides and skips the slides already embedded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEMO_QUERY = """
SELECT s.slide_id, s.num_patches, s.num_regions, s.roi_region_id,
       round(max(r.fused_weight)::DOUBLE, 3) AS roi_weight
FROM slides s JOIN regions r USING (slide_id)
GROUP BY ALL ORDER BY s.slide_id
"""


def run_demo(out_dir: str | Path = "care-scale-demo", *, overrides: list[str] | None = None,
             n_slides: int = 6, query: str = DEMO_QUERY) -> Any:
    """Make (or reuse) the demo cohort under ``out_dir``, embed it, print summary and query."""
    from care_scale.config import load_config, parse_overrides
    from care_scale.embed.config import EmbedConfig
    from care_scale.embed.pipeline import run_embedding
    from care_scale.query import sql
    from care_scale.synthetic import make_demo_cohort

    out = Path(out_dir).resolve()
    slides = out / "slides"
    if not any(slides.glob("*.tif*")):
        print(f"generating {n_slides} synthetic slides in {slides} ...", flush=True)
        make_demo_cohort(slides, n_slides=n_slides, seed=0)
    values: dict[str, Any] = {
        "source": str(slides),
        "warehouse": str(out / "warehouse"),
        "keep_patches": True,
        "slide_encoder": {"name": "care_tiny"},
        "commit_every": 3,
    }
    values.update(parse_overrides(overrides))
    config = load_config(EmbedConfig, None, values)
    print("embedding with seeded random tiny models (care_tiny + vit_demo_patch16_112): "
          "demo embeddings carry no biological meaning", flush=True)
    summary = run_embedding(config)
    print(summary.format())
    print(f"\nDuckDB over the Delta tables in {config.warehouse}:\n{query.strip()}\n")
    result = sql(config.warehouse, query)
    print(_format_rows(result))
    print(f"\nmore: care-scale sql --warehouse {config.warehouse} \"SELECT * FROM regions LIMIT 5\"")
    return summary


def _format_rows(result: Any) -> str:
    """Plain-text table of a query result (list of dicts, DataFrame or Arrow table)."""
    if hasattr(result, "to_pylist"):
        rows = result.to_pylist()
    elif hasattr(result, "to_dict"):
        rows = result.to_dict("records")
    else:
        rows = list(result)
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
