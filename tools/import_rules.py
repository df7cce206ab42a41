"""Check the package's import rules: ``python tools/import_rules.py [src/pushforward]``.

Some packages keep their modules private: the rest of the library uses them only through the
names their ``__init__`` exports (so a module can move or split without touching its users):

* ``pushforward.engine`` — problems, the planner, the strategies and their contractions;
* ``pushforward.layers`` — the layer structure and the one producer of layer pieces.

A module outside such a package that imports one of its submodules (``from
pushforward.engine.problem import Problem``, ``import pushforward.layers.chain``) breaks the
rule. Imports are read as ``tools/import_cycles.py`` reads them (``ast``, lazy imports
included). Exits 1 listing every violation.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from import_cycles import imports

#: Packages whose submodules only their own modules import.
PRIVATE = ("pushforward.engine", "pushforward.layers")


def violations(root: Path) -> list[tuple[str, str]]:
    """``(importer, imported submodule)`` for every import that breaks a rule."""
    found = []
    for module, targets in imports(root).items():
        for target in sorted(targets):
            for package in PRIVATE:
                inside = module == package or module.startswith(package + ".")
                if target.startswith(package + ".") and not inside:
                    found.append((module, target))
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "src/pushforward").resolve()
    found = violations(root)
    for module, target in found:
        package = next(p for p in PRIVATE if target.startswith(p + "."))
        print(f"{module} imports {target}: use what {package} exports instead")
    if not found:
        print(f"import rules hold ({', '.join(PRIVATE)} used through their packages)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
