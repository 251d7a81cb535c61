"""The package's import graph has no cycle: between modules (every static import counts,
the ones inside functions too) and between folders (two subpackages never import each
other, and a subpackage never imports a top-level module that imports it back)."""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "appliance"


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of an import written in `module` (relative ones resolved)."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _known(name: str, known: set[str]) -> str:
    """The longest known module prefix: `appliance.llm.engine.Engine` is appliance.llm.engine."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name


def _imports_of(root: Path, path: Path, known: set[str]) -> set[str]:
    module = _module_name(root, path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, known) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            # `from appliance.http import app` imports the module app; a name that is no
            # module (`from appliance.config import Settings`) imports its module.
            found.update(_known(f"{base}.{alias.name}", known) for alias in node.names)
    return found - {"", module}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its text."""
    paths = sorted(package.rglob("*.py"))
    root = package.parent
    known = {_module_name(root, path) for path in paths}
    return {_module_name(root, path): _imports_of(root, path, known) for path in paths}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in sorted(graph.get(node, ())):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _folder(module: str) -> str:
    """The unit of the folder rule: a subpackage (appliance.llm) or a top-level module."""
    return ".".join(module.split(".")[:2])


def folder_graph(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = folders.setdefault(_folder(module), set())
        edges.update(_folder(target) for target in targets if "." in target)
        edges.discard(_folder(module))
    return folders


def _chains(graph: Mapping[str, set[str]], component: list[str]) -> list[str]:
    """Each edge inside a cycle, to say where to cut it."""
    members = set(component)
    return [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]


def test_no_module_imports_itself_back() -> None:
    graph = import_graph()
    found = [_chains(graph, component) for component in cycles(graph)]
    assert found == [], f"import cycles between modules: {found}"


def test_no_two_folders_import_each_other() -> None:
    modules = import_graph()
    graph = folder_graph(modules)
    found = []
    for component in cycles(graph):
        members = set(component)
        found.append(
            [
                f"{module} -> {target}"
                for module, targets in sorted(modules.items())
                for target in sorted(targets)
                if _folder(module) in members
                and _folder(target) in members
                and _folder(target) != _folder(module)
            ]
        )
    assert found == [], f"folders (or top-level modules) that import each other: {found}"


def test_config_depends_only_on_the_env_file_and_the_settings_table() -> None:
    allowed = {"appliance", "appliance.envfile", "appliance.config_docs"}
    assert import_graph()["appliance.config"] <= allowed


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    """A cycle hidden behind a lazy or relative import is still a cycle."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f() -> None:\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from ..a import f\n")
    (package / "sub" / "c.py").write_text("import pkg.a\nfrom . import b\n")
    graph = import_graph(package)
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert cycles(folder_graph(graph)) == [["pkg.a", "pkg.sub"]]
