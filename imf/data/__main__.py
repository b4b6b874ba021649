"""``python -m imf.data verify DIR``: see :mod:`imf.data.verify`."""

import sys

from imf.data.verify import main

sys.exit(main())
