"""`python -m torchmesh plan ...`: see `torchmesh/planning/cli.py`."""

import sys

from torchmesh.planning.cli import main

if __name__ == "__main__":
    sys.exit(main())
