"""``python -m imf.train`` (see :mod:`imf.train.cli`)."""

import sys

from imf.train.cli import main

sys.exit(main())
