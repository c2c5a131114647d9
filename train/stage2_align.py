"""CARE stage II (WSI-RNA, then WSI-protein alignment) on Ray Train.

    python train/stage2_align.py --config configs/train_stage2.yaml
    python train/stage2_align.py --demo
    ray job submit --working-dir . -- python train/stage2_align.py --config ...
"""

import sys

from care_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "stage2", *sys.argv[1:]]))
