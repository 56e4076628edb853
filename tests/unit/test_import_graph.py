"""The import structure of ``protocol/`` and ``proxy/``: no circle, and nothing imports upward.

Read from the source with :mod:`ast` (nothing is imported). The layers, lowest first; a module may
import from its own layer and the ones below, never from one above:

0. ``protocol``: RESP bytes in, values out; no I/O.
1. the base of ``proxy``: every module directly in ``proxy/`` that is not named below (config,
   settings, errors, live, connect, state, runtime, upstream, ratelog, admin). A new module lands
   here, and so must import nothing above it, unless it is placed on purpose.
2. the connections and the pipeline: ``proxy.relay``, ``proxy.cluster``, ``proxy.events``,
   ``proxy.fleet``.
3. the shell: ``proxy.server``, ``proxy.cli``, ``proxy.__main__``.

An import only for type annotations (under ``if TYPE_CHECKING:``) is checked the same way, except
the few in :data:`TYPE_ONLY`, each with the reason it may point back. Importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py`` first, so those count as imported too (unless the
importer is inside them). Collapsed to folders (``proxy/events/`` one node), there is no circle
either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "proxy")

LAYER_NAMES = ("protocol", "proxy base", "connections and pipeline", "shell")
#: Longest prefix wins; anything in proxy/ that is not listed is base (1).
LAYERS = {
    "protocol": 0,
    "proxy": 1,
    "proxy.relay": 2,
    "proxy.cluster": 2,
    "proxy.events": 2,
    "proxy.fleet": 2,
    "proxy.sentinel": 2,  # follows the master with the cluster's control query; the server wires it
    "proxy.server": 3,
    "proxy.cli": 3,
    "proxy.__main__": 3,
}

#: Imports under ``if TYPE_CHECKING:`` that may point upward or close a circle, and why.
TYPE_ONLY = {
    ("proxy.cluster.links", "proxy.cluster.relay"):
        "a NodeLink reports each reply and failure to the client connection that owns it",
    ("proxy.cluster.routes", "proxy.cluster.relay"):
        "the routes are the cluster connection's command table: they act on the connection given",
}

Edge = tuple[str, str]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(nodes: Iterable[ast.AST], type_only: bool = False) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, at any depth (a late import inside a function runs too), and
    whether it is under ``if TYPE_CHECKING:``."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _imports(node.body, True)
            yield from _imports(node.orelse, type_only)
        else:
            yield from _imports(ast.iter_child_nodes(node), type_only)


def _targets(importer: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> Iterator[str]:
    """The modules of ours an import statement runs: the module named (``from a import b`` names
    ``a.b`` when that is a module), and the packages above it that the importer is not inside."""
    if isinstance(node, ast.Import):
        named = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = importer.split(".")
            if not known[importer].name == "__init__.py":
                package = package[:-1]
            package = package[:len(package) - node.level + 1]
            base = ".".join([*package, *([base] if base else [])])
        named = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    for name in named:
        parts = name.split(".")
        for end in range(1, len(parts) + 1):
            target = ".".join(parts[:end])
            inside = importer == target or importer.startswith(target + ".")
            if target in known and target != importer and (end == len(parts) or not inside):
                yield target


def edges() -> tuple[set[Edge], set[Edge]]:
    """(imports that run, imports only for type checking), between our own modules."""
    known = modules()
    running: set[Edge] = set()
    typing_only: set[Edge] = set()
    for name, path in known.items():
        for node, type_only in _imports([ast.parse(path.read_text(), str(path))]):
            for target in _targets(name, node, known):
                (typing_only if type_only else running).add((name, target))
    return running, typing_only - running


def circles(graph: set[Edge]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a sorted list."""
    nexts: dict[str, list[str]] = {}
    for a, b in graph:
        nexts.setdefault(a, []).append(b)
        nexts.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in nexts[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(nexts):
        if node not in index:
            visit(node)
    return found


#: Drawn as one room each when folders are drawn whole; the modules directly in proxy/ stand alone.
FOLDERS = ("protocol", "proxy.events", "proxy.cluster", "proxy.fleet")


def folder(module: str) -> str:
    return next((f for f in FOLDERS if module == f or module.startswith(f + ".")), module)


def _show(found: list[list[str]]) -> str:
    return "\n".join("circle: " + ", ".join(group) for group in found)


def test_no_import_circle() -> None:
    running, typing_only = edges()
    found = circles(running | (typing_only - TYPE_ONLY.keys()))
    assert not found, "modules that import each other, an arrow of each circle must go:\n" + _show(found)


def test_no_circle_between_folders() -> None:
    running, typing_only = edges()
    kept = running | (typing_only - TYPE_ONLY.keys())
    found = circles({(folder(a), folder(b)) for a, b in kept if folder(a) != folder(b)})
    assert not found, "folders that import each other:\n" + _show(found)


def test_nothing_imports_upward() -> None:
    running, typing_only = edges()
    upward = sorted(
        f"{a} ({LAYER_NAMES[layer(a)]}) imports {b} ({LAYER_NAMES[layer(b)]})"
        + (" for type checking only" if (a, b) in typing_only else "")
        for a, b in running | typing_only
        if layer(b) > layer(a) and (a, b) not in TYPE_ONLY
    )
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_exceptions_are_still_needed_and_only_for_type_checking() -> None:
    running, typing_only = edges()
    assert not TYPE_ONLY.keys() & running, "an import listed in TYPE_ONLY now runs: it may not"
    assert TYPE_ONLY.keys() <= typing_only, "an entry of TYPE_ONLY matches no import any more: remove it"


def test_protocol_imports_nothing_of_the_proxy() -> None:
    running, typing_only = edges()
    assert [(a, b) for a, b in running | typing_only if layer(a) == 0 and layer(b) > 0] == []


def test_the_reader_sees_what_is_there() -> None:
    """The graph is read right: a few arrows that exist, and one that must not."""
    running, typing_only = edges()
    assert ("proxy.server", "proxy.relay") in running
    assert ("proxy.relay", "proxy.admin") in running
    assert ("proxy.cli", "proxy.server") in running  # a late import, inside main()
    assert ("proxy.server", "proxy.events") in running  # the package's __init__ runs first
    assert ("proxy.admin", "proxy.relay") not in running | typing_only  # admin.BarrierOwner
    assert ("proxy.events.service", "proxy.events") not in running  # inside its own package
