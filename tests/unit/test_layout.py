"""The layout shows the architecture: imports point one way, and only transports/ imports
torch.distributed (STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import islands

ROOT = Path(islands.__file__).parent
# A package may import from itself and from those listed (directly or transitively lower).
ALLOWED = {
    "core": {"core", "codecs"},  # config validates codec names against the registry
    "codecs": {"core", "codecs"},
    "aggregators": {"core", "aggregators"},
    "data": {"core", "data"},
    "models": {"core", "models"},
    "transports": {"core", "codecs", "aggregators", "transports"},
    "collectives": {"core", "codecs", "aggregators", "transports", "collectives"},
    "algorithms": {"core", "codecs", "aggregators", "transports", "collectives", "algorithms"},
    "metrics": {"core", "metrics"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_transports_import_torch_distributed():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).parts[0] != "transports"
                 and any(n.startswith("torch.distributed") for n in imports_of(p))]
    assert offenders == []


def test_imports_point_one_way():
    bad = []
    for p in ROOT.rglob("*.py"):
        package = p.relative_to(ROOT).parts[0]
        if package not in ALLOWED:
            continue
        for name in imports_of(p):
            if name.startswith("islands."):
                target = name.split(".")[1]
                if target not in ALLOWED[package]:
                    bad.append(f"{p.relative_to(ROOT)} imports {name}")
    assert bad == []


def test_every_module_imports():
    import importlib

    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        importlib.import_module(".".join(rel.parts).removesuffix(".__init__"))
