"""No import circles among our modules, and the engine library imports no UI, server or plug-in code.

The graph is built from the source (AST, nothing is imported). An edge ``a -> b`` means running module
``a`` may import ``b``:

- ``import x.y.z`` / ``from x.y import z`` add edges to the module named (the longest prefix that is one
  of ours; ``from pkg import name`` is an edge to ``pkg.name`` when that is a module) and to every package
  above it, because importing ``x.y.z`` runs ``x/__init__.py`` and ``x/y/__init__.py`` first; packages
  that contain the importer itself are skipped (they are already being imported when it runs);
- imports inside functions count: they run later, but a circle they close is still a circle in the design;
- imports under ``if TYPE_CHECKING:`` do not count: they never run.

Any strongly connected component with more than one module is a circle, and the test fails listing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "webui", "benchmarks", "extensions")
#: What the engine library (pipelines/) must never import: our UI/server/plug-ins and the web stack.
ENGINE_FORBIDDEN = {"webui", "extensions", "benchmarks", "gradio", "fastapi", "uvicorn", "starlette"}


def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``packages`` under ``root``.

    Folders whose names are not identifiers (``extensions/example.disabled``) cannot be imported by a
    dotted name and are left out.
    """
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if all(part.isidentifier() for part in parts):
                modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).split(".")[-1] == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: at module level, in functions and classes, in ``else`` of an
    ``if TYPE_CHECKING:``, but not in its body."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names an import statement in ``module`` asks for, relative imports made absolute."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, base] if base else package)
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules running it may import (see the module docstring)."""
    modules = project_modules(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        own_packages = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 2)}
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for name in _imported_names(node, module, path.name == "__init__.py"):
                target = _resolve(name, modules)
                if target is None:
                    continue
                parts = target.split(".")
                for depth in range(1, len(parts) + 1):
                    step = ".".join(parts[:depth])
                    if step in modules and step not in own_packages:
                        edges.add(step)
        graph[module] = edges
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))
    return sorted(circles)


def _describe(circles: list[list[str]], graph: dict[str, set[str]]) -> str:
    lines = []
    for circle in circles:
        members = set(circle)
        lines.append("circle: " + ", ".join(circle))
        lines += [f"    {a} -> {b}" for a in circle for b in sorted(graph[a] & members)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the project


def test_the_project_has_no_import_circles():
    graph = import_graph(ROOT)
    circles = import_circles(graph)
    assert not circles, "import circles (break them by moving code, not by deferring imports):\n" + _describe(
        circles, graph
    )


def test_the_graph_sees_the_project_imports():
    graph = import_graph(ROOT)
    assert {"pipelines.engine", "webui.extension_api", "extensions.lora.library"} <= set(graph)
    assert "pipelines.models.weights" in graph["pipelines.models.checkpoints"]
    assert "pipelines.models" in graph["pipelines.prompts.embeddings"]  # the parent package's __init__ runs too
    assert "pipelines.models" not in graph["pipelines.models.checkpoints"]  # but not for its own package
    assert "webui.extension_api" in graph["extensions.lora.library"]
    assert sum(len(edges) for edges in graph.values()) > 100


def test_engine_library_imports_no_ui_server_or_plugins():
    """pipelines/ is a plain library: no webui/, extensions/, benchmarks/, gradio, fastapi, uvicorn or
    starlette, by any import (function-level and ``TYPE_CHECKING`` ones too) nor ``importlib``."""
    offenders = []
    for path in sorted((ROOT / "pipelines").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("importlib.import_module", "__import__"):
                names = [arg.value for arg in node.args[:1] if isinstance(arg, ast.Constant) and isinstance(
                    arg.value, str)]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {name}" for name in names
                          if name.split(".")[0] in ENGINE_FORBIDDEN]
    assert not offenders, "the engine library imports what it must not:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_circle_closed_by_a_function_level_import_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n\nVALUE = 1\n",
        "pkg/b.py": "def later():\n    from pkg.a import VALUE\n    return VALUE\n",
        "pkg/c.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a"}
    assert import_circles(graph) == [["pkg.a", "pkg.b"]]
    assert "pkg.a -> pkg.b" in _describe(import_circles(graph), graph)


def test_a_circle_through_a_parent_package_init_is_found(tmp_path):
    # pkg.util imports pkg.sub.leaf, which runs pkg/sub/__init__.py first, which imports pkg.util.
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from pkg.util import helper\n",
        "pkg/sub/leaf.py": "X = 1\n",
        "pkg/util.py": "from pkg.sub.leaf import X\n\ndef helper():\n    return X\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.util"] == {"pkg.sub", "pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == set()  # its own packages are no edge
    assert import_circles(graph) == [["pkg.sub", "pkg.util"]]


def test_relative_imports_close_circles_too(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .inner import thing\n",
        "pkg/inner/__init__.py": "from .. import tools\n\nthing = 1\n",
        "pkg/tools.py": "from .inner import thing as _thing\n",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.inner"] == {"pkg.tools"}
    assert graph["pkg.tools"] == {"pkg.inner"}
    assert import_circles(graph) == [["pkg.inner", "pkg.tools"]]


def test_type_checking_imports_are_no_edges(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import B\n",
        "pkg/b.py": (
            "from typing import TYPE_CHECKING\nimport typing\n\n"
            "if TYPE_CHECKING:\n    from pkg.a import A\n"
            "if typing.TYPE_CHECKING:\n    import pkg.a\nelse:\n    import pkg.c\n\nclass B: ...\n"
        ),
        "pkg/c.py": "",
    })
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"}  # the else branch runs
    assert import_circles(graph) == []


def test_longer_circles_are_reported_whole(tmp_path):
    _write(tmp_path, {
        "one/__init__.py": "",
        "one/a.py": "import one.b\n",
        "one/b.py": "from one import c\n",
        "one/c.py": "class C:\n    def m(self):\n        import one.a\n",
        "one/d.py": "import one.a\n",
        "two/__init__.py": "",
        "two/x.py": "import two.y\n",
        "two/y.py": "import two.x\n",
    })
    circles = import_circles(import_graph(tmp_path, ("one", "two")))
    assert circles == [["one.a", "one.b", "one.c"], ["two.x", "two.y"]]


def test_folders_that_are_not_identifiers_are_skipped(tmp_path):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/example.disabled/extension.py": "import pkg\n"})
    assert set(project_modules(tmp_path, ("pkg",))) == {"pkg"}
