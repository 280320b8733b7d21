"""The tree shows the layers, and the imports keep to them.

- Every module of a pure package imports nothing that does I/O. Each is imported in a
  fresh interpreter (this one has long loaded everything), and the test fails naming the
  module and what it pulled in. A new module in a pure package is checked without being
  listed: the packages are.
- No import cycle among the project's modules (a cycle is two concerns that cannot be
  understood, tested or replaced apart). Every import counts, those inside functions
  and under `if TYPE_CHECKING:` too: a back-reference for annotations is still one.

docs/architecture.md lists the packages and these rules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, loaded_in_fresh_interpreter

#: Packages whose every module is pure: values and decisions, no sockets, files or loops.
PURE_PACKAGES = (
    "broker.core",
    "broker.policy",
    "broker.geins",
    "broker.emulator.model",
    "broker.customers.model",
)
#: Pure modules of the client package (which is small enough not to split in two).
PURE_CLIENT_MODULES = ("geins_broker_client.protocol", "geins_broker_client.health")
IO_PACKAGES = (
    "trio",
    "httpx",
    "httpcore",
    "platformdirs",
    "h11",
    "httptools",
    "anyio",
    "prometheus_client",
    "coredis",
    "sqlite3",
)
ROOTS = {
    "broker": REPO / "broker",
    "geins_broker_client": REPO / "clients/python/geins_broker_client",
}


def modules_under(package: str) -> list[str]:
    """Every module of `package` (a dotted name under one of ROOTS), found on disk."""
    top, _, rest = package.partition(".")
    folder = ROOTS[top].joinpath(*rest.split(".")) if rest else ROOTS[top]
    found = []
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(ROOTS[top]).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append(".".join((top, *parts)))
    return found


PURE = [m for p in PURE_PACKAGES for m in modules_under(p)] + list(PURE_CLIENT_MODULES)


def test_every_pure_package_is_found() -> None:
    assert len(PURE) > len(PURE_PACKAGES) + len(PURE_CLIENT_MODULES)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    loaded = loaded_in_fresh_interpreter(f"import {module}", IO_PACKAGES)
    assert loaded == [], f"import {module} loaded {', '.join(loaded)}"


def _imports(module: str, path: Path, modules: set[str]) -> Iterator[str]:
    """The project modules `module` imports. `from package import submodule` imports the
    submodule: the package itself is already being imported, as every module's is."""
    tree = ast.parse(path.read_text("utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names]
            yield from names
            if not all(name in modules for name in names):
                yield base


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package counts as its __init__)."""
    files: dict[str, Path] = {}
    for top, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((top, *parts))] = path
    return {
        module: {
            name for name in _imports(module, path, set(files)) if name in files and name != module
        }
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in `graph` as a path that ends where it starts, or None."""
    done: set[str] = set()
    for start in sorted(graph):
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        on_path = {start}
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                path = [n for n, _ in stack]
                return [*path[path.index(child) :], child]
            elif child not in done:
                stack.append((child, iter(sorted(graph[child]))))
                on_path.add(child)
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
