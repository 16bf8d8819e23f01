"""`python -m trainer.export RUN_DIR OUT_DIR [--step N]` (see trainer/export/__init__.py)."""
import sys

from trainer.export import main

sys.exit(main())
