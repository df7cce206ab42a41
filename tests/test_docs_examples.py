"""Every Python example of the documentation runs as written: the ``python`` blocks of the
Markdown pages under ``docs/`` (except excerpts, marked ``# excerpt of <file>`` on their first
line: that file runs in its own test) and the ``pf-exec`` blocks that the site's build runs.

The Laplace workflow's example also runs in a fresh interpreter, to show it needs no
laplace-torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP = ("_build", "api/generated", "auto_examples", "benchmarks/generated")
BLOCK = re.compile(r"^```(?:python|\{pf-exec\})\n(.*?)^```", flags=re.S | re.M)


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if not any(part in p.as_posix() for part in SKIP))


def blocks(page: Path) -> list[str]:
    return [b for b in BLOCK.findall(page.read_text()) if not b.startswith("# excerpt of ")]


EXAMPLES = [
    pytest.param(block, id=f"{page.relative_to(DOCS)}:{i}")
    for page in pages()
    for i, block in enumerate(blocks(page))
]


def test_the_docs_have_examples():
    assert len(EXAMPLES) >= 12
    named = {p.id.split(":")[0] for p in EXAMPLES}
    for page in (
        "index.md",
        "concepts.md",
        "guides/laplace_workflow.md",
        "guides/laplace_torch.md",
        "guides/custom_operator.md",
        "guides/troubleshooting.md",
    ):
        assert page in named, page


@pytest.mark.parametrize("block", EXAMPLES)
def test_docs_example_runs(block, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block, "docs example", "exec"), {"__name__": "docs"})


CHECK = """
import sys
example = sys.stdin.read()
exec(compile(example, "the Laplace workflow", "exec"), {"__name__": "docs"})
assert "laplace" not in sys.modules, "the example imported laplace-torch"
"""


def test_laplace_workflow_runs_without_laplace_torch():
    example = blocks(DOCS / "guides" / "laplace_workflow.md")[0]
    assert "laplace" not in re.findall(r"^\s*(?:from|import) (\w+)", example, flags=re.M)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), src]))
    done = subprocess.run(
        [sys.executable, "-c", CHECK], input=example, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "tensor(" in done.stdout  # the printed log marginal likelihood
