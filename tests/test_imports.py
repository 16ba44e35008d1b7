"""The shape of the code base, read from its source with ``ast`` (nothing is imported).

Import floors, top to bottom; a module may import its own floor or lower, never higher,
and no two packages may import each other (directly or round a cycle):

4. CLI: ``fedadapt/cli.py``, ``fedadapt/cmd_*.py``, ``fedadapt/argtypes.py``
3. ``simulations``
2. ``server``, ``client`` (the ServerApp and the ClientApp; neither imports the other)
1. ``strategies``, ``privacy``, ``continual``, ``imaging``, ``report``, ``deploy``.
   ``deploy`` (a site folder's files, certificates, the SuperLink/SuperNode command
   lines) sits here: the ClientApp reads a deployed site's ``site.toml`` through it, and
   it needs only ``privacy`` (policy, ledger) and ``imaging`` (intensity settings).
0. core: the rest of ``fedadapt/`` (``config``, ``keys``, ``messages``, ``layout``,
   ``atomic``, ``names``): it imports nothing of the project above it.

Every import counts, including those inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from fedadapt import SUBPACKAGES

ROOT = Path(__file__).resolve().parents[1]
FLOOR = {"cli": 4, "simulations": 3, "server": 2, "client": 2, "strategies": 1,
         "privacy": 1, "continual": 1, "imaging": 1, "report": 1, "deploy": 1, "core": 0}
OLD_TOP_LEVEL = (*SUBPACKAGES, "fedimaging", "fedreport")
MAX_FUNCTION_LINES = 80


def _library_files() -> dict[str, Path]:
    """Module name → file, for every library module (``fedadapt.*``)."""
    out: dict[str, Path] = {}
    for folder, prefix in [("fedadapt", "fedadapt"),
                           *[(s, f"fedadapt.{s}") for s in SUBPACKAGES]]:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


FILES = _library_files()


def package_of(module: str) -> str:
    """The floor package of a ``fedadapt`` module name."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    if len(parts) > 1 and (parts[1] in ("cli", "argtypes") or parts[1].startswith("cmd_")):
        return "cli"
    return "core"


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` (all nesting levels)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_pkg]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:  # `from fedadapt import keys`: the module fedadapt.keys
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in FILES else base))
    return out


def _project_edges() -> list[tuple[str, int, str, str]]:
    """``(importer module, line, imported module, ...)`` of every project import."""
    edges = []
    for module, path in FILES.items():
        for line, target in _imports(module, path):
            if target == "fedadapt" or target.startswith("fedadapt."):
                edges.append((module, line, target, str(path.relative_to(ROOT))))
    return edges


def test_every_library_module_is_on_a_floor() -> None:
    assert {package_of(m) for m in FILES} == set(FLOOR)


def test_no_import_runs_back_up() -> None:
    upward = [f"{where}:{line}: {module} ({package_of(module)}, floor "
              f"{FLOOR[package_of(module)]}) imports {target} ({package_of(target)}, floor "
              f"{FLOOR[package_of(target)]})"
              for module, line, target, where in _project_edges()
              if FLOOR[package_of(target)] > FLOOR[package_of(module)]]
    assert not upward, "imports that run up a floor:\n" + "\n".join(upward)


def test_no_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {p: set() for p in FLOOR}
    for module, _line, target, _where in _project_edges():
        a, b = package_of(module), package_of(target)
        if a != b:
            graph[a].add(b)
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "package import cycles:\n" + "\n".join(sorted(set(cycles)))


def test_server_and_client_do_not_import_each_other() -> None:
    crossing = [f"{where}:{line}: {target}" for module, line, target, where in _project_edges()
                if {package_of(module), package_of(target)} == {"server", "client"}]
    assert not crossing


@pytest.mark.parametrize("folder", ["fedadapt", *SUBPACKAGES, "tests", "benchmarks"])
def test_no_bare_import_of_the_old_top_level_names(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level
                     and node.module else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names
                    if n.split(".")[0] in OLD_TOP_LEVEL]
    assert not bad, "import them as fedadapt.<name>:\n" + "\n".join(bad)


def test_no_library_function_is_longer_than_80_lines() -> None:
    long = []
    for path in FILES.values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno  # type: ignore[operator]
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name} ({n})")
    assert not long, "functions over 80 lines (split them into named steps):\n" + "\n".join(long)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The rules above can fail: a core module importing the server is caught."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from fedadapt.server.app import app\n"
                    "from fedadapt import keys\n")
    found = _imports("fedadapt.bad", path)
    assert (2, "fedadapt.server.app") in found and (3, "fedadapt.keys") in found
    assert FLOOR[package_of("fedadapt.server.app")] > FLOOR[package_of("fedadapt.bad")]
