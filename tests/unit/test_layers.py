"""Imports go one way between the layers of relay/ and glidein_wrapper/, and never in a circle.

Every module is read with :mod:`ast`; nothing of the package is imported or run. The layers,
bottom to top, and what each may import (docs/ARCHITECTURE.md draws them):

- relay (``relay/__init__.py``): nothing else of relay; every layer may import it.
- proto (``relay.proto``, the sans-IO protocol cores): relay.
- leaf (``relay.errors``, ``relay.metrics``, ``relay.logs``, ``relay.systemd``): relay, proto.
- net (``relay.net``, asyncio glue) and config (``relay.config``): relay, proto, leaf.
- worker (``relay.worker``) and exit (``relay.exit``): relay, proto, leaf, net, config.
- tools (``relay.tools``: relay check, relay demo): the above, worker and exit.
- cli (``relay.cli``): anything.
- glidein_wrapper: anything but cli and exit.

Each layer may also import its own modules; net and config never import each other, nor
worker and exit. An import counts wherever it stands: at module level, in a function, in a
``try``, under ``if TYPE_CHECKING:``: a module may not even name a type of a layer above it,
and a part that needs its owner describes what it needs as a Protocol of its own (a session's
``SessionHost``) instead of importing the owner's module, so no two modules lean on each other
even for types.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("relay", "glidein_wrapper")

ORDER = (
    "relay", "proto", "leaf", "net", "config", "worker", "exit", "tools", "cli", "glidein_wrapper",
)  # fmt: skip
"""The layers, bottom to top."""

LEAVES = ("relay.errors", "relay.metrics", "relay.logs", "relay.systemd")
"""Leaf utilities: above the protocol cores, below everything else."""

_BELOW_DAEMONS = {"relay", "proto", "leaf", "net", "config"}
ALLOWED: dict[str, set[str]] = {
    "relay": set(),
    "proto": {"relay"},
    "leaf": {"relay", "proto"},
    "net": {"relay", "proto", "leaf"},
    "config": {"relay", "proto", "leaf"},
    "worker": set(_BELOW_DAEMONS),
    "exit": set(_BELOW_DAEMONS),
    "tools": _BELOW_DAEMONS | {"worker", "exit"},
    "cli": _BELOW_DAEMONS | {"worker", "exit", "tools", "glidein_wrapper"},
    "glidein_wrapper": _BELOW_DAEMONS | {"worker", "tools"},
}
"""Layer -> the other layers its modules may import (its own is always allowed)."""


def layer_of(module: str) -> Optional[str]:
    """The layer of a module of relay or glidein_wrapper, by name; None: in no layer."""

    def within(package: str) -> bool:
        return module == package or module.startswith(package + ".")

    if module == "relay":
        return "relay"
    for name in ("proto", "net", "config", "worker", "exit", "tools"):
        if within(f"relay.{name}"):
            return name
    if any(within(leaf) for leaf in LEAVES):
        return "leaf"
    if within("relay.cli"):
        return "cli"
    if within("glidein_wrapper"):
        return "glidein_wrapper"
    return None


@dataclass(frozen=True)
class Import:
    """``importer`` imports ``target`` (a module, or the module that holds the name)."""

    importer: str
    target: str
    where: str  # file:line
    type_only: bool  # under ``if TYPE_CHECKING:``


# -- reading the tree -----------------------------------------------------------------------
def tree_sources(root: Path = ROOT) -> tuple[dict[str, str], dict[str, str]]:
    """Module name -> source, and module name -> file, for every module of PACKAGES."""
    sources: dict[str, str] = {}
    files: dict[str, str] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            sources[name] = path.read_text(encoding="utf-8")
            files[name] = rel.as_posix()
    return sources, files


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(
    nodes: list[ast.stmt], type_only: bool
) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement below ``nodes``, with whether it stands under TYPE_CHECKING."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_nodes(node.body, True)
            yield from _import_nodes(node.orelse, type_only)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    stmts = [c for c in children if isinstance(c, ast.stmt)]
                    # except handlers and match cases hold their statements one level down
                    for holder in children:
                        if not isinstance(holder, ast.stmt):
                            stmts.extend(getattr(holder, "body", []))
                    yield from _import_nodes(stmts, type_only)


def _base(module: str, is_package: bool, level: int) -> str:
    """The package a relative import of ``level`` dots starts from."""
    parts = module.split(".")
    if not is_package:
        parts.pop()
    return ".".join(parts[: len(parts) - (level - 1)])


def imports_of(
    module: str, source: str, known: set[str], packages: set[str], filename: str
) -> list[Import]:
    """The imports of one module that name relay or glidein_wrapper."""
    found: list[Import] = []
    tree = ast.parse(source, filename)
    for node, type_only in _import_nodes(tree.body, False):
        line = f"{filename}:{node.lineno}"
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                prefix = _base(module, module in packages, node.level)
                base = f"{prefix}.{base}" if base else prefix
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in PACKAGES:
                found.append(Import(module, target, line, type_only))
    return found


def import_graph(
    sources: Mapping[str, str], files: Optional[Mapping[str, str]] = None
) -> dict[str, list[Import]]:
    """Module -> its imports of the packages, for modules given as name -> source.

    A name that is a prefix of another module is a package (relative imports start there)."""
    known = set(sources)
    packages = {m for m in known if any(o.startswith(m + ".") for o in known)}
    packages |= {m for m in known if files and files.get(m, "").endswith("__init__.py")}
    return {
        module: imports_of(module, source, known, packages, (files or {}).get(module, module))
        for module, source in sources.items()
    }


# -- the rules ------------------------------------------------------------------------------
def wrong_way(graph: Mapping[str, list[Import]]) -> list[str]:
    """One line per import that goes against the layers."""
    problems: list[str] = []
    for module, imports in sorted(graph.items()):
        layer = layer_of(module)
        if layer is None:
            continue  # reported by unplaced()
        allowed = ALLOWED[layer] | {layer}
        for imp in imports:
            target_layer = layer_of(imp.target)
            if target_layer in allowed:
                continue
            what = "in no layer" if target_layer is None else f"layer {target_layer}"
            may = ", ".join(name for name in ORDER if name in allowed)
            type_only = " (under TYPE_CHECKING)" if imp.type_only else ""
            problems.append(
                f"{imp.where}: {module} (layer {layer}) imports {imp.target} ({what})"
                f"{type_only}; {layer} may import: {may}"
            )
    return problems


def unplaced(modules: list[str]) -> list[str]:
    return [m for m in sorted(modules) if layer_of(m) is None]


def cycles(graph: Mapping[str, list[Import]]) -> list[str]:
    """Each circle of imports (TYPE_CHECKING ones too), as ``a -> b -> a`` with the place of
    each import. Every import that closes a circle appears in at least one."""
    edges: dict[str, dict[str, str]] = {m: {} for m in graph}
    for module, imports in graph.items():
        for imp in imports:
            if imp.target in graph and imp.target != module:
                edges[module].setdefault(imp.target, imp.where)

    # Tarjan's strongly connected components, iteratively (no recursion limit to meet).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
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
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)

    def path(source: str, goal: str, inside: set[str]) -> list[str]:
        """Shortest import path source -> goal within one component."""
        came: dict[str, Optional[str]] = {source: None}
        todo = deque([source])
        while todo:
            node = todo.popleft()
            if node == goal:
                break
            for nxt in sorted(edges[node]):
                if nxt in inside and nxt not in came:
                    came[nxt] = node
                    todo.append(nxt)
        out: list[str] = []
        at: Optional[str] = goal
        while at is not None:
            out.append(at)
            at = came[at]
        return out[::-1]

    found: dict[tuple[str, ...], str] = {}
    for component in components:
        for a in sorted(component):
            for b in sorted(edges[a]):
                if b not in component:
                    continue
                ring = [a, *path(b, a, component)][:-1]  # a -> b -> ... (back to a)
                turn = ring.index(min(ring))
                ring = ring[turn:] + ring[:turn]
                key = tuple(ring)
                if key in found:
                    continue
                hops = list(zip(ring, ring[1:] + ring[:1]))
                chain = " -> ".join([*ring, ring[0]])
                places = ", ".join(edges[x][y] for x, y in hops)
                found[key] = f"{chain} ({places})"
    return sorted(found.values())


# -- the tree as it is ----------------------------------------------------------------------
def _real_graph() -> tuple[dict[str, list[Import]], dict[str, str]]:
    sources, files = tree_sources()
    return import_graph(sources, files), files


def _report(title: str, lines: list[str]) -> str:
    return f"{title} ({len(lines)}):\n  " + "\n  ".join(lines)


def test_the_tree_is_read() -> None:
    """The check reads the real packages (it cannot pass on an empty or misread tree)."""
    graph, files = _real_graph()
    assert {"relay", "relay.proto", "relay.cli", "glidein_wrapper"} <= set(graph)
    assert files["relay.proto"] == "relay/proto/__init__.py"
    assert any(layer_of(m) == "worker" for m in graph)
    targets = {imp.target for imp in graph["relay.cli"]}
    assert "relay.tools.check" in targets  # an import inside a function counts
    assert "relay.proto" in {imp.target for imp in graph["relay.proto.mux"]}


def test_every_module_has_a_layer() -> None:
    graph, files = _real_graph()
    lost = [f"{files[m]}: {m}" for m in unplaced(list(graph))]
    assert not lost, _report(
        "modules in no layer (put them in a layer's package, or add them to "
        "tests/unit/test_layers.py and docs/ARCHITECTURE.md)",
        lost,
    )


def test_imports_go_one_way() -> None:
    graph, _ = _real_graph()
    problems = wrong_way(graph)
    assert not problems, _report("imports against the layers", problems)


def test_no_import_cycles() -> None:
    graph, _ = _real_graph()
    found = cycles(graph)
    assert not found, _report("import cycles", found)


# -- the checker itself ---------------------------------------------------------------------
SYNTHETIC = {
    "relay": '__version__ = "0"',
    "relay.errors": "from relay.proto import ProtocolError\nimport relay",
    "relay.metrics": "from relay.net.pump import X",  # wrong way: leaf -> net
    "relay.proto": "class ProtocolError(Exception): ...",
    "relay.proto.codec": "from relay.proto import ProtocolError\nfrom . import frames",
    "relay.proto.frames": "def f():\n    from relay.net import pump\n",  # wrong way, in a function
    "relay.net": "",
    "relay.net.pump": "from relay.net.carrier import C\nfrom relay.errors import E",
    "relay.net.carrier": "def later():\n    from .pump import P\n",  # circle with pump
    "relay.net.tls": "try:\n    import relay.config.values\nexcept ImportError:\n    pass\n",
    "relay.config": "",
    "relay.config.values": "from relay.secrets import load",  # relay.secrets: in no layer
    "relay.secrets": "",
    "relay.worker": "",
    "relay.worker.daemon": "from relay.worker.client import Client\nfrom relay.net import pump",
    "relay.worker.client": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from relay.worker.daemon import Daemon  # a part naming its owner: a circle\n"
        "else:\n"
        "    from relay.exit import sessions  # worker -> exit\n"
    ),
    "relay.exit": "",
    "relay.exit.sessions": "from relay.exit.daemon import D",
    "relay.exit.daemon": "from relay.exit.sessions import S",  # circle
    "relay.tools": "",
    "relay.tools.check": "from relay.worker.daemon import D\nfrom relay.exit import daemon",
    "relay.cli": "import glidein_wrapper\nfrom relay.tools import check",
    "glidein_wrapper": "",
    "glidein_wrapper.main": "from relay.tools.check import c\nfrom relay.cli import main",
}


def test_checker_finds_wrong_way_imports() -> None:
    graph = import_graph(SYNTHETIC)
    problems = wrong_way(graph)
    pairs = {(line.split(" ")[1], line.split(" imports ")[1].split(" ")[0]) for line in problems}
    assert pairs == {
        ("relay.metrics", "relay.net.pump"),
        ("relay.proto.frames", "relay.net.pump"),
        ("relay.net.tls", "relay.config.values"),
        ("relay.config.values", "relay.secrets"),
        ("relay.worker.client", "relay.exit.sessions"),
        ("glidein_wrapper.main", "relay.cli"),
    }, "\n".join(problems)
    line = next(p for p in problems if p.split(" ")[1] == "relay.proto.frames")
    assert line.startswith("relay.proto.frames:2: ")
    assert "layer net" in line and line.endswith("proto may import: relay, proto")
    assert unplaced(list(SYNTHETIC)) == ["relay.secrets"]


def test_checker_resolves_relative_imports() -> None:
    graph = import_graph(SYNTHETIC)
    assert {i.target for i in graph["relay.proto.codec"]} == {"relay.proto", "relay.proto.frames"}
    assert {i.target for i in graph["relay.net.carrier"]} == {"relay.net.pump"}


def test_checker_finds_cycles_type_only_ones_too() -> None:
    found = cycles(import_graph(SYNTHETIC))
    assert [c.split(" (")[0] for c in found] == [
        "relay.exit.daemon -> relay.exit.sessions -> relay.exit.daemon",
        "relay.net.carrier -> relay.net.pump -> relay.net.carrier",
        "relay.worker.client -> relay.worker.daemon -> relay.worker.client",
    ], found
    assert "relay.net.carrier:2, relay.net.pump:1" in found[1]


def test_checker_reports_each_circle_of_a_tangle() -> None:
    tangle = {
        "relay.net.a": "import relay.net.b\nimport relay.net.c",
        "relay.net.b": "import relay.net.a",
        "relay.net.c": "import relay.net.a",
    }
    found = [c.split(" (")[0] for c in cycles(import_graph(tangle))]
    assert found == [
        "relay.net.a -> relay.net.b -> relay.net.a",
        "relay.net.a -> relay.net.c -> relay.net.a",
    ]
