"""Run the benchmark suite: ``python benchmarks/run.py [options of pushforward bench]``.

The same as ``pushforward bench`` run from the repository root (relative paths, such as the
default output directory ``benchmarks/results/``, are taken from there).
"""

import os
import sys
from pathlib import Path

from pushforward.cli import main

if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent.parent)
    sys.exit(main(["bench", *sys.argv[1:]]))
