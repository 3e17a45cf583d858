"""The import graph of ``src/vmad`` has no cycle and keeps its layers apart.

Every module under ``src/vmad`` (package ``__init__`` modules included) is parsed with :mod:`ast`; each
``import vmad.x`` / ``from vmad.x import y`` / relative import / ``importlib.import_module("vmad.x")``
anywhere in the file (module level, functions, methods, conditional blocks) is an edge to the module it
names: ``from vmad.x import y`` points at ``vmad.x.y`` when that is a module, else at ``vmad.x``; a name that
is no module points at its longest prefix that is one. Python also runs the ``__init__`` of every parent
package on import; those implicit edges are not counted (a package importing its own submodules would
otherwise always be a cycle), nor is a module importing itself, nor imports under ``if TYPE_CHECKING:``
(never executed; they exist for type hints only).
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "vmad"

Graph = Mapping[str, Iterable[str]]


# ------------------------------------------------------------------------------------------ graph


def module_files(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is package)}`` for every ``.py`` file of ``package`` under ``src``."""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        out[".".join(parts)] = (path, is_package)
    return out


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """``name`` itself when it is a module, else its longest prefix that is one (None: none is)."""
    known = set(known)
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name an ``ImportFrom`` imports from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def imported_modules(
    module: str, path: Path, is_package: bool, known: Iterable[str], package: str
) -> set[str]:
    """The modules of ``package`` that ``module`` (source file ``path``) imports, anywhere in the file."""
    known = set(known)
    found: set[str] = set()

    def add(name: str) -> None:
        if _in_package(name, package) and (target := _resolve(name, known)) is not None:
            found.add(target)

    for node in _walk_runtime(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if alias.name != "*" and sub in known else base)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name == "import_module" and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(arg.value)
    found.discard(module)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk_runtime(tree: ast.AST) -> Iterable[ast.AST]:
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks (their ``else`` is kept)."""
    todo: deque[ast.AST] = deque([tree])
    while todo:
        node = todo.popleft()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def build_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every module of ``package``."""
    files = module_files(src, package)
    return {m: imported_modules(m, path, is_pkg, files, package) for m, (path, is_pkg) in files.items()}


# ------------------------------------------------------------------------------------------ cycles


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Strongly connected components (Tarjan), each sorted; nodes only reached as targets count too."""
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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
            out.append(sorted(component))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph: Graph, start: str, within: set[str]) -> list[str]:
    """A shortest path ``start -> ... -> start`` through the nodes ``within`` (BFS)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph.get(v, ())):
            if w not in within:
                continue
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle")


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle path ``[a, b, ..., a]`` per strongly connected component that has a cycle."""
    cycles = []
    for component in strongly_connected(graph):
        start = component[0]
        if len(component) > 1 or start in graph.get(start, ()):
            cycles.append(_shortest_cycle(graph, start, set(component)))
    return sorted(cycles)


def format_cycles(cycles: list[list[str]]) -> str:
    return "\n".join("  " + " -> ".join(c) for c in cycles)


# ------------------------------------------------------------------------------------------ tests


def test_cycle_finder_on_hand_made_graphs() -> None:
    cyclic = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(cyclic) == [["a", "b", "c", "a"], ["e", "e"]]
    two = {"x": {"y"}, "y": {"x", "z"}, "z": {"y"}}  # one component, reported once
    assert find_cycles(two) == [["x", "y", "x"]]
    acyclic = {"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}
    assert find_cycles(acyclic) == []


def test_graph_builder_on_a_hand_made_package(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import thing\n",
        "a.py": "import os\nfrom . import b\n\ndef f():\n    from .sub import c\n    import pkg.sub\n",
        "b.py": (
            "from pkg.sub.c import name\nfrom pkg import a as _a, missing\n"
            "if TYPE_CHECKING:\n    import pkg.sub\n"
        ),
        "sub/__init__.py": "from .. import b\nfrom . import c\n",
        "sub/c.py": "import importlib\nimportlib.import_module('pkg.b')\nfrom pkg.sub import c\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = build_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b", "pkg.sub", "pkg.sub.c"},
        "pkg.b": {"pkg", "pkg.a", "pkg.sub.c"},
        "pkg.sub": {"pkg.b", "pkg.sub.c"},
        "pkg.sub.c": {"pkg.b"},
    }
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg"]]


def test_the_graph_sees_vmad_imports() -> None:
    graph = build_graph()
    assert "vmad" in graph and "vmad.data" in graph and "vmad.atomic" in graph
    assert "vmad.data.coco" in graph["vmad.data.io"]  # module level
    assert "vmad.infer.detector" in graph["vmad.cli.eval"]  # function level


def test_no_import_cycles() -> None:
    cycles = find_cycles(build_graph())
    assert not cycles, f"import cycles in src/{PACKAGE}:\n{format_cycles(cycles)}"


def _imports_from(graph: Graph, importer: str, imported: Iterable[str]) -> list[str]:
    """``"a -> b"`` for every module ``a`` under ``importer`` importing a module under one of ``imported``."""
    return [
        f"{module} -> {target}"
        for module, targets in sorted(graph.items())
        if _in_package(module, importer)
        for target in sorted(targets)
        if any(_in_package(target, layer) for layer in imported)
    ]


def test_layering() -> None:
    graph = build_graph()
    bad = _imports_from(graph, "vmad.train", ["vmad.infer"])
    bad += _imports_from(graph, "vmad.model", ["vmad.train", "vmad.infer", "vmad.cli", "vmad.eval"])
    assert not bad, "layering violations (importer -> imported):\n" + "\n".join(f"  {b}" for b in bad)
