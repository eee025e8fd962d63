"""The package layers hold: the monitor uses the swarm layer of peer/, never the trainer app (issue 15's wall)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = ("peer.swarm", "peer.hivemind_gaps")  # what every node speaks


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement in the file names (also imports inside functions)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def peer_imports(folder: str) -> list[tuple[str, str]]:
    return [
        (str(path.relative_to(REPO)), module)
        for path in sorted((REPO / folder).rglob("*.py"))
        for module in sorted(imported_modules(path))
        if module == "peer" or module.startswith("peer.")
    ]


def in_shared_layer(module: str) -> bool:
    return any(module == layer or module.startswith(layer + ".") for layer in SHARED)


def test_layer_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def load():\n    from peer.runtime import Peer\n")
    assert imported_modules(source) == {"peer.runtime"}


def test_the_monitor_imports_only_the_swarm_layer_of_peer():
    outside = [(path, module) for path, module in peer_imports("monitor") if not in_shared_layer(module)]
    assert peer_imports("monitor"), "the check found no import of peer at all: it is looking in the wrong place"
    assert outside == [], f"the monitor imports the trainer app: {outside}"


@pytest.mark.parametrize("layer", ["peer/swarm", "peer/hivemind_gaps"])
def test_the_swarm_layer_does_not_import_the_trainer_app(layer):
    outside = [(path, module) for path, module in peer_imports(layer) if not in_shared_layer(module)]
    assert outside == [], f"{layer} imports the trainer app: {outside}"
