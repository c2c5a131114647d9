"""CARE stage I (self-supervised) on Ray Train.

    python train/stage1_ssl.py --config configs/train_stage1.yaml --set optim.steps=1000
    python train/stage1_ssl.py --demo
    ray job submit --working-dir . -- python train/stage1_ssl.py --config ...
"""

import sys

from care_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "stage1", *sys.argv[1:]]))
