import sys

from care_scale.cli import main

sys.exit(main())
