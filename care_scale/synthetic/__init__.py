"""Synthetic data with a known answer: pixel-level slides (``slides``) and, for training,
feature-level cohorts (``cohort``)."""

from collections.abc import Callable

from care_scale.synthetic.cohort import FeatureCohort, make_feature_cohort
from care_scale.synthetic.regions import make_region_cohort
from care_scale.synthetic.slides import (
    TISSUE_TYPES,
    SyntheticSlide,
    make_demo_cohort,
    write_synthetic_slide,
)

# Feature-level cohorts by name (``data.synthetic_cohort`` of the training configs):
# "composition" = labels from tissue composition (pooling can solve them), "arrangement" =
# labels from spatial arrangement (pooling cannot; see synthetic/regions.py).
COHORTS: dict[str, Callable[..., FeatureCohort]] = {
    "composition": make_feature_cohort,
    "arrangement": make_region_cohort,
}

__all__ = [
    "COHORTS",
    "TISSUE_TYPES",
    "FeatureCohort",
    "SyntheticSlide",
    "make_demo_cohort",
    "make_feature_cohort",
    "make_region_cohort",
    "write_synthetic_slide",
]
