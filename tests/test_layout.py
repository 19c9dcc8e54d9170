"""The arrows point one way: the core knows nothing of clients, servers or experiments, the server never
reaches into a client, and no two packages import each other (DESIGN.md "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "common", "client", "server", "proto", "simulations")
# package -> the FedHydra packages it may import
ALLOWED = {
    "proto": {"common"},  # its generator writes files atomically
    "common": set(),
    "client": {"common", "proto"},
    "server": {"common"},
    "simulations": {"common", "client", "server"},
    "cli": {"common", "client", "server", "simulations"},
}


def _imported_packages(path: Path, package: str) -> set[str]:
    """The FedHydra packages a module imports (absolute `fedhydra.X` and relative `..X` imports, lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level >= 2:  # `from ..client import x`: a sibling package of the fedhydra namespace
                names = ["fedhydra." + (node.module or "")]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedhydra" and len(parts) > 1 and parts[1] in PACKAGES and parts[1] != package:
                found.add(parts[1])
    return found


def violations(root: Path) -> list[str]:
    """Every import of a package that ALLOWED forbids, and every import cycle between packages."""
    edges: dict[str, set[str]] = {p: set() for p in PACKAGES}
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for target in _imported_packages(path, package):
                edges[package].add(target)
                if target not in ALLOWED[package]:
                    bad.append(f"{path.relative_to(root)} imports fedhydra.{target} ({package} must not)")
    for a in PACKAGES:
        for b in edges[a]:
            if a in edges.get(b, ()):
                bad.append(f"import cycle: {a} <-> {b}")
    return bad


def test_imports_follow_the_layout():
    assert violations(ROOT) == []


def test_a_forbidden_import_is_caught(tmp_path):
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "common" / "core.py").write_text("def f():\n    from fedhydra.client.state import ClientState\n")
    (tmp_path / "server" / "app.py").write_text("from ..simulations import partition\n")
    found = violations(tmp_path)
    assert "common/core.py imports fedhydra.client (common must not)" in found
    assert "server/app.py imports fedhydra.simulations (server must not)" in found
    assert len(found) == 2
