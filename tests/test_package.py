"""The package as users get it: ``python -m build`` makes a wheel and an sdist with one version
number, type information and the project's metadata; the wheel installs into a fresh virtual
environment and runs the README's quick start there.

Offline and fast: the build uses this environment's setuptools (``--no-isolation``), the wheel
is installed without dependencies, and the fresh environment reaches the torch installed here
through a ``.pth`` line (a path, so the editable install of this checkout is not active there).
"""

from __future__ import annotations

import email.parser
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import pushforward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """Wheel and sdist built from a copy of the sources (so nothing is written into the
    checkout)."""
    tmp = tmp_path_factory.mktemp("package")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "src" / "pushforward",
        src / "src" / "pushforward",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    out = tmp / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def the(pattern: str, folder: Path) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"{pattern}: {found}"
    return found[0]


def test_wheel_and_sdist_carry_one_version_and_the_metadata(dist):
    version = pushforward.__version__
    wheel = the(f"pushforward-{version}-py3-none-any.whl", dist)
    sdist = the(f"pushforward-{version}.tar.gz", dist)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = email.parser.Parser().parsestr(
            zf.read(f"pushforward-{version}.dist-info/METADATA").decode()
        )
    assert "pushforward/py.typed" in names
    assert "pushforward/__init__.py" in names and "pushforward/curvature/operators.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "examples/", "docs/"))]
    assert meta["Version"] == version
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert f"pushforward-{version}.dist-info/licenses/LICENSE" in names
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Programming Language :: Python :: 3.11") for c in classifiers)
    assert re.search(r"torch>=2\.3", " ".join(meta.get_all("Requires-Dist")))
    extras = set(meta.get_all("Provides-Extra"))
    assert {"laplace", "bo", "hf", "progress", "docs", "test"} <= extras
    assert "pip install pushforward" in meta.get_payload()  # the README is the description
    with tarfile.open(sdist) as tf:
        members = tf.getnames()
    assert f"pushforward-{version}/src/pushforward/py.typed" in members
    assert f"pushforward-{version}/pyproject.toml" in members
    assert f"pushforward-{version}/LICENSE" in members


QUICK_START = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]

CHECK = """
import sys
import pushforward
assert pushforward.__file__.startswith(sys.prefix), pushforward.__file__
from importlib.metadata import version
assert version("pushforward") == pushforward.__version__
exec(compile(sys.stdin.read(), "README quick start", "exec"), {"__name__": "quickstart"})
print("quick start ran with", pushforward.__file__)
"""


def test_wheel_installs_in_a_fresh_venv_and_runs_the_quick_start(dist, tmp_path):
    wheel = the("pushforward-*.whl", dist)
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # torch (and what it needs) from this environment, as a plain path: not its .pth files
    torch_home = Path(__import__("torch").__file__).parents[1]
    assert str(torch_home) in site.getsitepackages() or torch_home.exists()
    (Path(purelib) / "_torch_from_the_test_env.pth").write_text(f"{torch_home}\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    run = subprocess.run(
        [python, "-I", "-c", CHECK],
        input=QUICK_START,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert "Plan: variance" in run.stdout and f"{venv}" in run.stdout
