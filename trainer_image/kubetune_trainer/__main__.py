"""`python -m kubetune_trainer` runs the same entry point as `kubetune-train`."""

import sys

from kubetune_trainer.cli import main

sys.exit(main())
