"""`python -m torchmesh plan ...`: see `torchmesh/cli.py`."""

import sys

from torchmesh.cli import main

if __name__ == "__main__":
    sys.exit(main())
