"""Models: ViT patch encoders, the CARE slide encoder, safe checkpoints, patch-feature files.

    from care_scale.models import create_patch_encoder, create_slide_encoder
    enc = create_patch_encoder("vit_demo_patch16_112")        # uint8 (B,H,W,3) -> (B,192)
    care = create_slide_encoder("care_tiny")                    # paired with that encoder
    result = care.encode(read_patch_features("slide.h5"))       # numpy SlideEncoding

Importing this package imports every model family (``care``, ``vit``), which registers their
models; the registry itself imports no family (timm's layout).
"""

# The families, each registering its models on import. `care` comes first through the
# names below; `vit` is imported for its registrations only.
from care_scale.models import vit  # noqa: F401
from care_scale.models.care import (
    CARE,
    CARE_OUTPUT_FIELDS,
    CareConfig,
    CareOutput,
    CAREReferenceAdapter,
    SlideEncoding,
    reference_adapter,
)
from care_scale.models.checkpoints import (
    LoadReport,
    load_into,
    model_version,
    resolve_weights,
    save_checkpoint,
)
from care_scale.models.features import (
    PatchFeatures,
    coords_to_grid,
    detect_step,
    read_patch_features,
)
from care_scale.models.registry import (
    PatchEncoderSpec,
    SlideEncoderSpec,
    UntrainedWeightsWarning,
    create_patch_encoder,
    create_slide_encoder,
    get_patch_encoder_spec,
    get_slide_encoder_spec,
    list_patch_encoders,
    list_slide_encoders,
)

__all__ = [
    "CARE",
    "CARE_OUTPUT_FIELDS",
    "CAREReferenceAdapter",
    "CareConfig",
    "CareOutput",
    "LoadReport",
    "PatchEncoderSpec",
    "PatchFeatures",
    "SlideEncoderSpec",
    "SlideEncoding",
    "UntrainedWeightsWarning",
    "coords_to_grid",
    "create_patch_encoder",
    "create_slide_encoder",
    "detect_step",
    "get_patch_encoder_spec",
    "get_slide_encoder_spec",
    "list_patch_encoders",
    "list_slide_encoders",
    "load_into",
    "model_version",
    "read_patch_features",
    "reference_adapter",
    "resolve_weights",
    "save_checkpoint",
]
