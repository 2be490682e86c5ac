"""``python -m convexmix``: the command line."""

import sys

from convexmix.cli import main

if __name__ == "__main__":
    sys.exit(main())
