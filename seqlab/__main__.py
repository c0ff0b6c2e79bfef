"""``python -m seqlab ...``: the ``seqlab`` command (the same as the installed ``seqlab`` script)."""

import sys

from seqlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
