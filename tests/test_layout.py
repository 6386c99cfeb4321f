"""The package's imports follow its layout: no cycle, nothing imports upward.

Walks every module's imports with `ast` (those inside functions and under
TYPE_CHECKING too: a lazy import is still a dependency), resolves them to
dovenotify's modules and checks them against the layers below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dovenotify

ROOT = Path(dovenotify.__file__).parent
LINE_LIMIT = 400

# Each package (or top-level module) and what it may import besides itself; the
# package `dovenotify` itself holds only the version, which anything may read.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "store": {"core"},
    "relay": {"core", "store"},
    "events": {"core", "store"},
    "apns": {"core", "store"},
    "dovecot": {"core"},
    "admin": {"core", "store", "relay", "events", "apns", "dovecot"},
    "push": {"core", "store", "events", "apns", "admin"},
    "relay_process": {"core", "store", "relay", "apns"},
    "service": {"core", "store", "relay", "events", "apns", "admin", "push"},
    "cli": {
        "core",
        "store",
        "relay",
        "events",
        "apns",
        "dovecot",
        "admin",
        "push",
        "relay_process",
        "service",
    },
    "__main__": {"cli"},
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The dovenotify modules `name` imports (a package when that is what is named)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
    return {f for f in found if f in modules}


def unit(name: str) -> str:
    """The package (or top-level module) a module belongs to."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_package_has_its_place_in_the_layers() -> None:
    units = {unit(name) for name in module_names()} - {""}
    assert units == set(ALLOWED), "a package or module to place in ALLOWED"


def test_no_import_goes_upward_or_sideways() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        if unit(target) not in {"", unit(name)} and unit(target) not in ALLOWED[unit(name)]
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle() -> None:
    edges = graph()
    cycles = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(edges[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(module_names()))
def test_a_long_module_says_why(name: str) -> None:
    path = module_names()[name]
    lines = len(path.read_text().splitlines())
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines < LINE_LIMIT or f"{LINE_LIMIT} lines" in doc, (
        f"{path.relative_to(ROOT.parent)} has {lines} lines: split it, or say in its"
        f" docstring why it is over {LINE_LIMIT} lines"
    )


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    # The walker itself: a relative import resolves to the module it names.
    modules = {"dovenotify.store.sqlite": tmp_path, "dovenotify.relay.server": tmp_path}
    source = tmp_path / "m.py"
    source.write_text("from ..relay.server import Relay\nfrom . import sqlite\n")
    assert imports_of("dovenotify.store.x", source, modules) == {
        "dovenotify.relay.server",
        "dovenotify.store.sqlite",
    }
    assert "relay" not in ALLOWED["store"]
