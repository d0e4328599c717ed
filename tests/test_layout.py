"""The layout rules of docs/architecture.md, read from the code: every import (module level or inside a function),
followed transitively (importing a.b.c also runs a/__init__.py and a/b/__init__.py), must stay inside what a
package's floor allows, and no two modules may import each other, however indirectly.

    floor 0  protocol/, episode/                     the wire vocabulary and the episode format
    floor 1  data/, models/                          the synthetic world and datasets; building/loading models
    floor 2  tool_servers/, actors/, learner/        the roles, siblings: none imports another (actors use only
                                                     the tool servers' client library)
    floor 3  launcher/, launch.py                    placement, start-up, supervision, run outputs, offline modes
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "episode", "data", "models", "tool_servers", "actors", "learner", "launcher")
ENTRY_POINTS = ("launch",)  # top-level modules (launch.py)

# The tool servers' client library: all an actor may import of tool_servers/ (the package's __init__ runs too).
TOOL_CLIENT = frozenset({"tool_servers", "tool_servers.client", "tool_servers.errors", "tool_servers.discovery"})
FLOOR_0 = {"protocol", "episode"}
FLOOR_1 = FLOOR_0 | {"data", "models"}
# package -> the packages whose modules it may import, directly or transitively (itself included)
ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "episode": {"protocol", "episode"},
    "data": FLOOR_0 | {"data"},
    "models": FLOOR_1,
    "tool_servers": {"protocol", "tool_servers"},
    "actors": FLOOR_1 | {"actors", "tool_servers"},  # tool_servers: its client library only (TOOL_CLIENT)
    "learner": FLOOR_1 | {"learner"},
    "launcher": FLOOR_1 | {"tool_servers", "actors", "learner", "launcher"},
    "launch": FLOOR_1 | {"tool_servers", "actors", "learner", "launcher"},
}


def module_files(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every package module and entry point under `root`."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    for name in ENTRY_POINTS:
        if (root / f"{name}.py").is_file():
            found[name] = root / f"{name}.py"
    return found


def direct_imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The forage modules `name` imports anywhere in its file: `import a.b`, `from a import b` (a module b, or the
    package a), relative imports resolved."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where c is not a module of ours
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def with_parents(target: str) -> set[str]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    parts = target.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_graph(root: Path) -> dict[str, set[str]]:
    files = module_files(root)
    return {name: direct_imports(name, path, set(files)) for name, path in files.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module importing `start` runs, transitively (parents' __init__ included) -> the module it came by."""
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        current = stack.pop()
        for target in graph.get(current, ()):
            for module in with_parents(target):
                if module not in seen and module != start:
                    seen[module] = current
                    stack.append(module)
    return seen


def chain(seen: dict[str, str], start: str, end: str) -> str:
    path = [end]
    while path[-1] != start:
        path.append(seen[path[-1]])
    return " -> ".join(reversed(path))


def rule_violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per module and package it may not reach (the shortest import chain that reaches it)."""
    out = []
    for name in sorted(graph):
        package = name.split(".")[0]
        seen = reachable(graph, name)
        worst: dict[str, str] = {}  # what is broken -> the chain, shortest first
        for target in sorted(seen, key=lambda t: (len(chain(seen, name, t)), t)):
            other = target.split(".")[0]
            if other not in ALLOWED[package]:
                worst.setdefault(f"{package}/ may not import {other}/", chain(seen, name, target))
            elif package == "actors" and other == "tool_servers" and target not in TOOL_CLIENT:
                worst.setdefault("actors/ may use only the tool servers' client library (client, errors, discovery)",
                                 chain(seen, name, target))
        out += [f"{rule}: {path}" for rule, path in worst.items()]
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of two or more modules (Tarjan), each sorted; package __init__ edges to its own
    submodules count like any other import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def package_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    packages: dict[str, set[str]] = defaultdict(set)
    for name, targets in graph.items():
        for target in targets:
            if target.split(".")[0] != name.split(".")[0]:
                packages[name.split(".")[0]].add(target.split(".")[0])
    return import_cycles(dict(packages))


# ---------------------------------------------------------------------------------------------- the repository

def test_every_package_imports_only_what_its_floor_allows():
    graph = import_graph(ROOT)
    assert {name.split(".")[0] for name in graph} >= set(PACKAGES)  # nothing renamed away unnoticed
    violations = rule_violations(graph)
    assert not violations, "layout rules broken (docs/architecture.md):\n" + "\n".join(violations)


def test_no_import_cycle_between_modules_or_packages():
    graph = import_graph(ROOT)
    assert not import_cycles(graph), f"import cycles: {import_cycles(graph)}"
    assert not package_cycles(graph), f"package cycles: {package_cycles(graph)}"


def test_the_roles_are_siblings_above_the_ground_floor():
    """protocol/ and episode/ import no other package; no role reaches another role (actors: the client only)."""
    graph = import_graph(ROOT)
    for name in graph:
        package = name.split(".")[0]
        reached = {m.split(".")[0] for m in reachable(graph, name)}
        if package in FLOOR_0:
            assert reached <= FLOOR_0, (name, reached)
        if package in ("tool_servers", "learner"):
            assert not reached & {"actors", "learner", "tool_servers", "launcher"} - {package}, (name, reached)
        if package == "actors":
            assert not reached & {"learner", "launcher"}, (name, reached)


# ---------------------------------------------------------------------------------------------- the checker

def _tree(root: Path, files: dict[str, str]) -> None:
    for package in PACKAGES:
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
    for rel, text in files.items():
        (root / rel).write_text(text)


def test_the_checker_sees_a_role_reached_through_data_a_lazy_import_and_a_package_init(tmp_path):
    _tree(tmp_path, {
        "learner/sft.py": "from data.oracle import episodes\n",
        "data/oracle.py": "def episodes():\n    from actors import prompts\n",
        "actors/prompts.py": "",
        "actors/actor.py": "import tool_servers.client\n",
        "tool_servers/__init__.py": "from tool_servers.server import Server\n",
        "tool_servers/server.py": "", "tool_servers/client.py": "",
    })
    violations = rule_violations(import_graph(tmp_path))
    assert any(v.startswith("learner/ may not import actors/: learner.sft -> data.oracle -> actors")
               for v in violations)
    assert any(v.startswith("data/ may not import actors/") for v in violations)
    assert any(v.endswith("client library (client, errors, discovery): actors.actor -> tool_servers -> "
                          "tool_servers.server") for v in violations)


def test_the_checker_finds_cycles_with_relative_and_from_imports(tmp_path):
    _tree(tmp_path, {
        "learner/weights.py": "def make():\n    from .weights_nccl import Nccl\n",
        "learner/weights_nccl.py": "from learner.weights import cast\n",
        "models/ensure.py": "from learner import sft\n", "learner/sft.py": "from models.ensure import x\n",
    })
    graph = import_graph(tmp_path)
    assert ["learner.weights", "learner.weights_nccl"] in import_cycles(graph)
    assert ["learner.sft", "models.ensure"] in import_cycles(graph)
    assert ["learner", "models"] in package_cycles(graph)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_has_a_readme(package):
    assert (ROOT / package / "README.md").is_file(), f"{package}/ has no README.md"
