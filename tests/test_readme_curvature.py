"""The curvature section's standalone example (train → fit → tune the prior → predict) runs as
written, in a fresh interpreter, without importing laplace-torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEADING = "## Curvature and Laplace posteriors"

CHECK = """
import sys
example = sys.stdin.read()
exec(compile(example, "README curvature example", "exec"), {"__name__": "readme"})
assert "laplace" not in sys.modules, "the example imported laplace-torch"
"""


def test_standalone_example_runs_without_laplace_torch():
    section = README.read_text().split(HEADING, 1)[1]
    example = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    assert "laplace" not in re.findall(r"^\s*(?:from|import) (\w+)", example, flags=re.M)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", CHECK], input=example, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "tensor(" in done.stdout  # the printed log marginal likelihood
