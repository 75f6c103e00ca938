"""The package is layered: imports only go downward.

No two modules import each other, directly or through others; no two first-level packages do (`data`, `eval`,
`train`, ... and each top-level module counts as its own package); and no function imports one of the package's own
modules (a function-level import hides a cycle instead of removing it; lazy imports are for optional heavy
dependencies only, such as torch or libtpu). The import graph is read from the source with `ast`, without importing.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = "qwen_flash_jax"
REPO = pathlib.Path(__file__).resolve().parent.parent


def _modules(root: pathlib.Path, package: str) -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module of `package` under `root`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_init)
    return out


def _targets(node, module: str, is_init: bool, modules) -> list[str]:
    """The package's own modules an import statement loads: `from a.b import c` names module a.b.c when c is a
    module, else a.b itself (c is an attribute of a.b's __init__)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [n for n in names if n in modules]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_init else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    out = []
    for alias in node.names:
        name = f"{base}.{alias.name}"
        if name in modules:
            out.append(name)
        elif base in modules:
            out.append(base)
    return out


class _ImportWalker(ast.NodeVisitor):
    def __init__(self):
        self.depth = 0  # how many function bodies enclose the current node
        self.imports: list[tuple[ast.AST, bool]] = []  # (import node, inside a function)

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        self.imports.append((node, self.depth > 0))

    visit_ImportFrom = visit_Import


def import_graph(root: pathlib.Path, package: str = PACKAGE):
    """(module edges, function-level imports as 'module:line -> target'), for the package under `root`.

    A package's __init__ importing its own submodules is how a package exposes them, not a cycle: those edges are
    left out."""
    modules = _modules(root, package)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    function_level = []
    for module, (path, is_init) in modules.items():
        walker = _ImportWalker()
        walker.visit(ast.parse(path.read_text(), str(path)))
        for node, in_function in walker.imports:
            for target in _targets(node, module, is_init, modules):
                if target == module or (is_init and target.startswith(module + ".")):
                    continue
                edges[module].add(target)
                if in_function:
                    function_level.append(f"{module}:{node.lineno} -> {target}")
    return edges, function_level


def package_edges(edges: dict[str, set[str]], package: str = PACKAGE) -> dict[str, set[str]]:
    """The module edges between first-level packages (`pkg.data.world.core` belongs to `pkg.data`)."""

    def group(module):
        return ".".join(module.split(".")[:2])

    out: dict[str, set[str]] = {group(m): set() for m in edges}
    for source, targets in edges.items():
        out[group(source)].update(group(t) for t in targets if group(t) != group(source))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_itself_through_others():
    edges, _ = import_graph(REPO)
    assert len(edges) > 50  # the walk found the package
    assert cycles(edges) == []


def test_no_first_level_packages_import_each_other():
    edges, _ = import_graph(REPO)
    assert {"qwen_flash_jax.data", "qwen_flash_jax.eval", "qwen_flash_jax.train"} <= set(package_edges(edges))
    assert cycles(package_edges(edges)) == []


def test_no_function_imports_one_of_the_packages_own_modules():
    _, function_level = import_graph(REPO)
    assert function_level == []


def _write(root: pathlib.Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_walk_finds_cycles_and_function_level_imports_in_a_small_package(tmp_path):
    _write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.low import base\n",  # parent -> child: not an edge
            "pkg/low/__init__.py": "",
            "pkg/low/base.py": "import os\n",
            "pkg/mid/__init__.py": "",
            "pkg/mid/a.py": "from ..low import base\nfrom . import b\n",
            "pkg/mid/b.py": "from pkg.top.c import run\n",  # mid -> top, and top -> mid below: a package cycle
            "pkg/top/__init__.py": "",
            "pkg/top/c.py": "from pkg.mid import a\n\ndef run():\n    from pkg.low import base\n    import json\n",
        },
    )
    edges, function_level = import_graph(tmp_path, "pkg")
    assert edges["pkg"] == set()
    assert edges["pkg.mid.a"] == {"pkg.low.base", "pkg.mid.b"}
    assert edges["pkg.mid.b"] == {"pkg.top.c"}
    assert cycles(edges) == [["pkg.mid.a", "pkg.mid.b", "pkg.top.c"]]
    assert cycles(package_edges(edges, "pkg")) == [["pkg.mid", "pkg.top"]]
    assert function_level == ["pkg.top.c:4 -> pkg.low.base"]  # json is not the package's own

    # The same package with the upward import removed is clean at both levels.
    _write(
        tmp_path,
        {
            "pkg/top/c.py": "from pkg.mid import a\nfrom pkg.low import base\n\ndef run():\n    pass\n",
            "pkg/mid/b.py": "from pkg.low.base import os\n",
        },
    )
    edges, function_level = import_graph(tmp_path, "pkg")
    assert edges["pkg.mid.b"] == {"pkg.low.base"}
    assert cycles(edges) == [] and cycles(package_edges(edges, "pkg")) == [] and function_level == []
