"""``python -m sksegcal.cli``: the ``sksegcal`` command."""

import sys

from ._main import main

if __name__ == "__main__":  # importing this module (docs, doctests) runs nothing
    sys.exit(main())
