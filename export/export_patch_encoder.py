"""Export a patch encoder to ONNX (+ TensorRT): same as ``care-scale export patch-encoder``.

    python export/export_patch_encoder.py --model vit_base_patch16_224 --out s3://b/exports/vitb
"""

import sys

from care_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "patch-encoder", *sys.argv[1:]]))
