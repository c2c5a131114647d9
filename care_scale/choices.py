"""The closed sets of values users pick from, each spelled once.

A leaf module (typing only): the library modules type their options with these ``Literal``s
and check values against them, and the CLI derives its ``choices=`` from them with
:func:`values`, so a new value is one edit here and never a third copy in an argparse list.
(The embedding job's own options are ``Literal`` fields of ``EmbedConfig``; the CLI reads
those from the config class the same way.)
"""

from __future__ import annotations

from typing import Any, Literal, get_args

#: Which vector stands for a slide in a probe (care-scale probe --feature).
FeatureKind = Literal["slide", "roi", "regions_mean"]
#: Probe models (care-scale probe --model).
ProbeModel = Literal["logistic", "knn", "cox"]
#: One sample per slide or per case (care-scale probe --unit).
Unit = Literal["auto", "slide", "case"]
#: What `care-scale similar` compares.
Level = Literal["slide", "region", "roi"]
#: Per-slide feature files `care-scale tables export-features` writes.
FeatureFormat = Literal["h5", "pt"]
#: TensorRT engine precisions (care-scale export patch-encoder --precision).
TensorRTPrecision = Literal["fp16", "fp32", "int8"]
#: How slides are cut into tiles (care_scale.tiling.TILING_MODES has one entry per value).
TilingMode = Literal["native", "trident"]
#: The pretraining stages (care-scale train STAGE).
Stage = Literal["stage1", "stage2"]
#: Patch-encoder numeric precisions (the embedding job's ``precision`` adds "auto";
#: care-scale bench --precisions). Which backend offers which: care_scale.inference.KINDS.
Precision = Literal["fp32", "bf16", "fp16", "int8"]


def values(choice: Any) -> tuple[str, ...]:
    """The values of one of the ``Literal`` types above, in order."""
    return tuple(get_args(choice))


__all__ = ["FeatureFormat", "FeatureKind", "Level", "Precision", "ProbeModel", "Stage",
           "TensorRTPrecision", "TilingMode", "Unit", "values"]
