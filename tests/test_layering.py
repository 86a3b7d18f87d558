"""Layers run one way: client/ and server/ import the shared package (fedslm/), never each
other, and the shared package imports neither of them (nor simulations/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("client", "server", "simulations")
FORBIDDEN = {"client": {"server", "simulations"}, "server": {"client", "simulations"},
             "fedslm": {"client", "server", "simulations"}}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (``fedslm.client.x`` and ``client.x`` alike)."""
    parts = module.split(".")
    if parts[0] == "fedslm" and len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    if parts[0] in LAYERS:
        return parts[0]
    return "fedslm" if parts[0] == "fedslm" else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module an import statement in ``path`` names (lazy ones included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def violations(package_dir: Path, layer: str) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        for line, module in imported_modules(path):
            if layer_of(module) in FORBIDDEN[layer]:
                found.append(f"{path.name}:{line} imports {module}")
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    assert violations(ROOT / layer, layer) == []


def test_the_check_catches_a_forbidden_import(tmp_path):
    """The rule is not vacuous: a server module importing the client is reported."""
    (tmp_path / "bad.py").write_text("import os\nfrom fedslm.client.train import train_local\n"
                                     "def f():\n    from fedslm.server import rounds\n")
    assert violations(tmp_path, "server") == ["bad.py:2 imports fedslm.client.train"]
    assert violations(tmp_path, "fedslm") == ["bad.py:2 imports fedslm.client.train",
                                              "bad.py:4 imports fedslm.server"]
    assert violations(tmp_path, "client") == ["bad.py:4 imports fedslm.server"]
