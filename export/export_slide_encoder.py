"""Export the CARE slide encoder to ONNX: same as ``care-scale export slide-encoder``.

    python export/export_slide_encoder.py --model care --checkpoint ckpt/ --out ./care-onnx
"""

import sys

from care_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", "slide-encoder", *sys.argv[1:]]))
