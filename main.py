"""Entry point: `uv run main.py [run|sweep|tune|bench] [options]` (see --help)."""

import sys

from llc_bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
