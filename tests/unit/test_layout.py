"""The layout shows the architecture: imports point one way, every package is covered, and
only transports/ imports torch.distributed (STYLE.md, DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import islands

ROOT = Path(islands.__file__).parent
_BELOW_ENGINE = {"core", "codecs", "aggregators", "transports", "collectives", "algorithms",
                 "tasks", "data", "models", "metrics", "engine"}
# A package may import from itself and from those listed (directly or transitively lower):
#   core <- codecs, aggregators <- transports <- collectives <- algorithms <- engine
#        <- sim, runtime, sweep <- cli;  tasks, models, data sit beside codecs; metrics beside them.
ALLOWED = {
    "core": {"core"},
    "codecs": {"core", "codecs"},
    "aggregators": {"core", "aggregators"},
    "data": {"core", "data"},
    "models": {"core", "models"},
    "tasks": {"core", "data", "models", "tasks"},
    "metrics": {"core", "metrics"},
    "transports": {"core", "codecs", "aggregators", "transports"},
    "collectives": {"core", "codecs", "aggregators", "transports", "collectives"},
    "algorithms": {"core", "codecs", "aggregators", "transports", "collectives", "algorithms"},
    "engine": _BELOW_ENGINE,
    "sim": _BELOW_ENGINE | {"sim"},
    "runtime": _BELOW_ENGINE | {"runtime"},
    # the sweep starts `islands sim` processes: it names the CLI, it does not import it
    "sweep": _BELOW_ENGINE | {"sweep"},
    "cli": _BELOW_ENGINE | {"sim", "runtime", "sweep", "cli"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def violations(package: str, names: set[str]) -> list[str]:
    """The imports of ``names`` that a module of ``package`` may not make."""
    return sorted(n for n in names if n.startswith("islands.")
                  and n.split(".")[1] not in ALLOWED[package])


def test_every_package_has_a_rule():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


def test_the_rule_catches_the_layer_breaks_that_matter():
    assert violations("runtime", {"islands.sim.runner"}) == ["islands.sim.runner"]
    assert violations("core", {"islands.codecs"}) == ["islands.codecs"]
    assert violations("algorithms", {"islands.engine"}) == ["islands.engine"]
    assert violations("tasks", {"islands.algorithms.base"}) == ["islands.algorithms.base"]
    assert violations("engine", {"islands.core.config", "islands.tasks"}) == []


def test_imports_point_one_way():
    bad = []
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if len(rel.parts) == 1:  # islands/__init__.py: the public API re-exports any layer
            continue
        bad += [f"{rel} imports {n}" for n in violations(rel.parts[0], imports_of(p))]
    assert bad == []


def test_only_transports_import_torch_distributed():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).parts[0] != "transports"
                 and any(n.startswith("torch.distributed") for n in imports_of(p))]
    assert offenders == []


def test_every_module_imports():
    import importlib

    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        importlib.import_module(".".join(rel.parts).removesuffix(".__init__"))


def test_unit_tests_start_no_processes():
    """Real processes belong in tests/integration/ (the unit folder stays fast)."""
    unit = Path(__file__).parent
    starters = ("subprocess", "multiprocessing", "Popen", "os.fork")
    offenders = [p.name for p in unit.glob("*.py") if p.name != Path(__file__).name
                 and any(s in p.read_text() for s in starters)]
    assert offenders == []


def _calls(rel: str) -> set[str]:
    tree = ast.parse((ROOT / rel).read_text())
    return {n.func.attr for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}


def test_the_round_is_sequenced_by_the_engine_alone():
    """The simulator, the runtime's worker and the drop-in trainer call the engine's round
    steps (``Engine.run``, or ``Engine.begin`` -> inner steps -> ``Engine.finish``); none of
    them starts, evaluates, records or commits a round itself."""
    sequencing = {"next_round", "begin_round", "record", "committed", "evaluate"}
    for rel in ("sim/runner.py", "runtime/worker.py", "runtime/join.py"):
        assert not _calls(rel) & sequencing, rel
    assert {"begin", "step", "finish"} <= _calls("runtime/join.py")
