"""Does CARE pretraining learn? Both stages over several seeds against baselines, one table.

    python train/evaluate.py --demo                 # = care-scale train evaluate --demo
    python train/evaluate.py --demo --seeds 5 --json
"""

import sys

from care_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "evaluate", *sys.argv[1:]]))
