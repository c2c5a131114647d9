"""Embed a cohort into Delta Lake tables; the entry point for ``ray job submit``.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/embed_cohort.py s3://bucket/cohort/ --warehouse s3://bucket/wh \\
        --config configs/embed_example.yaml --set concurrency.encoder_actors=4

Inside a submitted job RAY_ADDRESS is set, so the library joins that cluster; run by hand
without it, it starts a local Ray. Exit status: 0 all slides embedded (or already done),
3 when some slides failed (they are rows in the ``failures`` table), 2 on a configuration or
storage error.
"""

from __future__ import annotations

import sys

from care_scale.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
