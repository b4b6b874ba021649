"""``python -m imf.convert``: see :mod:`imf.convert.cli`."""

import sys

from imf.convert.cli import entry

if __name__ == "__main__":
    sys.exit(entry())
