"""The package's own import graph: one way, no loops, the stages in order, every public module
importable first.

The graph is read from the import statements themselves (module level and inside functions: a
deferred import closes a loop just the same), with networkx. ``passes`` sits at the bottom: it
imports torch, networkx and the standard library only, never ``glowq_fx``.
"""
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("glowq_fx", "passes")


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of our packages (``pkg`` for ``pkg/__init__.py``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` imports (``from pkg import sub`` is the submodule when there is
    one, else ``pkg`` itself)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
    return {t for t in targets if t in modules and t != name}


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in _imported(name, path, modules))
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph.number_of_edges() > 50  # the reader sees the imports (a broken reader finds no cycle)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, "import loops: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


# The stages, bottom to top: a module imports only modules of its own stage or of stages below it.
# ``base`` is the package's shared vocabulary (configuration, errors, the report, small helpers).
STAGES = ["passes", "base", "data", "capture", "calibration", "quant", "correction", "kernels", "ops", "modules",
          "backend", "evaluation", "selective", "checkpoint", "quantize", "glowq_fx", "studies", "cli"]
# ``glowq_fx``: the package's own __init__, the public API that re-exports the stages below it
BASE = {"config", "errors", "report", "registry", "_checks", "_console", "_devices", "_heap", "_version"}


def stage_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "passes" or len(parts) == 1:
        return parts[0]
    return "base" if parts[1] in BASE else parts[1]


def upward_imports(graph: nx.DiGraph) -> list[str]:
    rank = {s: i for i, s in enumerate(STAGES)}
    return [f"{a} ({stage_of(a)}) imports {b} ({stage_of(b)})" for a, b in graph.edges()
            if rank[stage_of(b)] > rank[stage_of(a)]]


def test_every_module_belongs_to_a_stage():
    unknown = sorted({stage_of(n) for n in _modules()} - set(STAGES))
    assert not unknown, f"modules outside every stage: {unknown}; add them to STAGES where they belong"


def test_each_stage_imports_only_the_stages_below_it():
    graph = import_graph()
    assert not upward_imports(graph), "imports that run up the stages:\n" + "\n".join(upward_imports(graph))


def test_an_upward_import_is_found():
    graph = nx.DiGraph([("glowq_fx.capture.run", "glowq_fx.modules.linear"),
                        ("glowq_fx.modules.linear", "glowq_fx.ops")])
    assert upward_imports(graph) == ["glowq_fx.capture.run (capture) imports glowq_fx.modules.linear (modules)"]


def test_passes_never_import_the_library_nor_anything_but_torch_and_networkx():
    modules = _modules()
    for name, path in modules.items():
        if not name.startswith("passes"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import)
                     else [(node.module or "").split(".")[0]] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for root in roots:
                assert root in {"torch", "networkx", "passes", "__future__"} or root in sys.stdlib_module_names, (
                    f"{name} imports {root}: passes may depend on torch and networkx only")


def test_a_loop_is_found_when_there_is_one(tmp_path, monkeypatch):
    """The checker itself: two modules importing each other (one inside a function) are a cycle."""
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("")
    (tmp_path / "passes" / "a.py").write_text("from passes.b import f\n")
    (tmp_path / "passes" / "b.py").write_text("def f():\n    from passes import a\n")
    (tmp_path / "glowq_fx").mkdir()
    (tmp_path / "glowq_fx" / "__init__.py").write_text("from .x import y\n")
    (tmp_path / "glowq_fx" / "x.py").write_text("y = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = import_graph()
    assert graph.has_edge("glowq_fx", "glowq_fx.x")  # relative import resolved
    assert sorted(map(sorted, nx.simple_cycles(graph))) == [["passes.a", "passes.b"]]


def _public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


# glowq_fx: ~90 fresh interpreters, 4.4 min of the 2-core CI machine; the static graph tests above
# (no cycle, the stages in order) run in CI, this one in `make test-slow`
@pytest.mark.parametrize("package", [pytest.param("glowq_fx", marks=pytest.mark.slow), "passes"])
def test_every_public_module_imports_first_in_a_fresh_interpreter(package):
    names = sorted(n for n in _modules() if n.split(".")[0] == package and _public(n))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def import_alone(name):
        code = (f"import sys; import {name}; "
                "assert {package!r} == 'glowq_fx' or 'glowq_fx' not in sys.modules, 'passes imported glowq_fx'")
        code = code.replace("{package!r}", repr(package))
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        return name, done.returncode, done.stderr.strip().splitlines()[-1:] if done.returncode else []

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        failed = [(n, err) for n, rc, err in pool.map(import_alone, names) if rc]
    assert len(names) > (20 if package == "glowq_fx" else 2)
    assert not failed, f"modules that fail to import first: {failed}"


def test_every_folder_of_modules_is_a_package_that_setuptools_ships():
    """A folder without ``__init__.py`` imports from a checkout (a namespace package) but is left
    out of a built wheel by ``find_packages``."""
    from setuptools import find_packages

    folders = {
        ".".join(p.parent.relative_to(ROOT).parts) for package in PACKAGES for p in (ROOT / package).rglob("*.py")
    }
    assert folders <= set(find_packages(str(ROOT), include=["glowq_fx*", "passes*"]))
