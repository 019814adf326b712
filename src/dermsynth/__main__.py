"""``python -m dermsynth``: the CLI without the console script (e.g. run from a source checkout on PYTHONPATH)."""
import sys

from dermsynth.cli import main

sys.exit(main())
