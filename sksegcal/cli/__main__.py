"""``python -m sksegcal.cli``: the ``sksegcal`` command."""

import sys

from ._main import main

sys.exit(main())
