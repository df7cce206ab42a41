"""Run the benchmark suite: ``python benchmarks/run.py [cases] [options]`` (``make bench``).

Relative paths, such as the default output directory ``benchmarks/results/``, are taken from the
repository root; ``--help`` lists the options.
"""

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    os.chdir(HERE.parent)
    sys.exit(main(sys.argv[1:]))
