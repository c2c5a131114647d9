"""The embedding job: a cohort of slides (or patch-feature files) -> CARE embeddings in Delta.

    from care_scale.embed import EmbedConfig, run_embedding
    summary = run_embedding(EmbedConfig(source="s3://bucket/cohort/", warehouse="s3://bucket/wh"))

See :mod:`care_scale.embed.pipeline` for the design. Importing this package loads no model and
starts no Ray; ``run_embedding`` does.
"""

from care_scale.embed.config import Concurrency, EmbedConfig, ModelRef
from care_scale.embed.pipeline import run_embedding
from care_scale.embed.progress import RunSummary
from care_scale.embed.sources import SlideSource, list_sources

__all__ = [
    "Concurrency", "EmbedConfig", "ModelRef", "RunSummary", "SlideSource",
    "list_sources", "run_embedding",
]
