"""CARE stage II (WSI-RNA, then WSI-protein alignment) on Ray Train.

    python train/stage2_align.py --config configs/train_stage2.yaml
    python train/stage2_align.py --demo
    ray job submit --working-dir . -- python train/stage2_align.py --config ...
"""

import sys

from care_scale.training.entry import script_main

if __name__ == "__main__":
    sys.exit(script_main("stage2"))
