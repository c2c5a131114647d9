"""Synthetic data with a known answer: pixel-level slides (``slides``) and, for training,
feature-level cohorts (``cohort``)."""

from care_scale.synthetic.cohort import FeatureCohort, make_feature_cohort
from care_scale.synthetic.slides import (
    TISSUE_TYPES,
    SyntheticSlide,
    make_demo_cohort,
    write_synthetic_slide,
)

__all__ = [
    "TISSUE_TYPES",
    "FeatureCohort",
    "SyntheticSlide",
    "make_demo_cohort",
    "make_feature_cohort",
    "write_synthetic_slide",
]
