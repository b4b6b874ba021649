"""``python -m imf.evaluate``: see :mod:`imf.evaluate`."""

import sys

from imf.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
