"""The rooms of the code and what each may import (docs/architecture.md), checked on the
source: every import statement, the lazy ones inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# room (folder) -> the facegate packages and third-party roots its modules may import
ALLOWED = {
    "core": {"facegate.core"},
    "gallery": {"facegate.core", "facegate.gallery"},
    "server": {"facegate.core", "facegate.gallery", "facegate.server"},
    "train": {"facegate.core", "facegate.train"},
    "export": {"facegate.core", "facegate.train", "facegate.export"},
}
NO_TORCH = ("core", "gallery", "server")  # the serving path runs without torch installed
# Reviewed exceptions: (module, imported package) and why.
EXCEPTIONS = {
    # `facegate gallery` reads the server's FACEGATE_* settings, so both name one gallery.
    ("gallery/cli.py", "facegate.server"),
}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_of(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "facegate" or len(parts) < 2:
        return None
    return ".".join(parts[:2]) if parts[1] in {"core", "gallery", "server", "train", "export"} else None


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_each_room_imports_only_what_it_may(room):
    wrong = []
    for path in sorted((REPO / room).rglob("*.py")):
        module = str(path.relative_to(REPO))
        for name in imports(path):
            package = package_of(name)
            if package and package not in ALLOWED[room] and (module, package) not in EXCEPTIONS:
                wrong.append(f"{module} imports {name}")
            if room in NO_TORCH and name.split(".")[0] == "torch":
                wrong.append(f"{module} imports torch")
    assert not wrong, "\n".join(wrong)


def test_the_rules_see_lazy_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from facegate.train.losses import x\n    import torch\n")
    assert imports(source) == {"facegate.train.losses", "torch"}
    assert package_of("facegate.train.losses") == "facegate.train"
