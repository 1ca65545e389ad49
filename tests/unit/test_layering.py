"""The package's import graph: no cycles, and no layer imports one above it.

Every module of ``lepton_hpc`` (and ``kernels/``, installed as ``lepton_hpc.kernels``) is read
with ``ast``; every ``import`` and ``from ... import`` counts, the ones inside functions too (a
lazy import hides a dependency from Python's loader, not from the design).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "lepton_hpc"

# module prefix -> module prefixes it must never import
FARM_MUST_NOT_IMPORT = (
    "lepton_hpc.sweep",
    "lepton_hpc.inference",
    "lepton_hpc.batch_predict",
    "lepton_hpc.commands",
    "lepton_hpc.cli",
    "lepton_hpc.engine",
    "lepton_hpc.training",
)
BASE_MUST_NOT_IMPORT = (
    "lepton_hpc.commands",
    "lepton_hpc.cli",
    "lepton_hpc.engine",
    "lepton_hpc.training",
    "lepton_hpc.sweep",
    "lepton_hpc.inference",
    "lepton_hpc.batch_predict",
    "lepton_hpc.scheduler",
)
# The restarting supervisor is not an MPI rank: nothing that starts MPI, nothing that runs a job.
SUPERVISOR_MUST_NOT_IMPORT = (
    "lepton_hpc.comm",
    "lepton_hpc.commands",
    "lepton_hpc.cli",
    "lepton_hpc.engine",
    "lepton_hpc.training",
    "lepton_hpc.sweep",
    "lepton_hpc.scheduler",
)
RULES = {
    "lepton_hpc.scheduler": FARM_MUST_NOT_IMPORT,
    "lepton_hpc.comm": BASE_MUST_NOT_IMPORT,
    "lepton_hpc.data": BASE_MUST_NOT_IMPORT,
    "lepton_hpc.models": BASE_MUST_NOT_IMPORT,
    "lepton_hpc.optim": BASE_MUST_NOT_IMPORT,
    "lepton_hpc.kernels": BASE_MUST_NOT_IMPORT,
    "lepton_hpc.testhooks": BASE_MUST_NOT_IMPORT,
    "lepton_hpc.supervisor": SUPERVISOR_MUST_NOT_IMPORT,
}


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    files = {}
    for base, prefix in ((ROOT / PACKAGE, PACKAGE), (ROOT / "kernels", f"{PACKAGE}.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([prefix, *parts])] = path
    return files


def imported(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (anywhere in its source)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in node.names)
    found = set()
    for target in targets:
        module = target
        while module and module not in modules:
            module = module.rpartition(".")[0]
        if module and module != name:
            found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_graph_sees_every_module_and_the_lazy_imports():
    graph = import_graph()
    assert {"lepton_hpc.cli", "lepton_hpc.scheduler.farm", "lepton_hpc.kernels"} <= set(graph)
    # imports inside functions count: the CLI loads its subcommands lazily
    assert "lepton_hpc.commands" in graph["lepton_hpc.cli"]
    assert "lepton_hpc.inference" in graph["lepton_hpc.batch_predict"]


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_no_upward_imports(layer):
    graph = import_graph()
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        if within(name, layer)
        for target in targets
        if any(within(target, banned) for banned in RULES[layer])
    )
    assert not wrong, "\n".join(wrong)


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
