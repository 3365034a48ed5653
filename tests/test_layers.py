"""The layers of the code, enforced: every import edge between tunefleet modules is read from the
source (any scope: module level and inside functions) and checked against the picture

    core (launch/core)  <-  generators  <-  runtime (distributed/)  <-  command line

A module may import its own layer or a lower one, never a higher one; the core imports nothing
else of tunefleet; and no two modules import each other, directly or around a cycle. A new module
must be given its layer here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"launch": "tunefleet.launch", "distributed": "tunefleet.distributed", "slurm": "tunefleet.slurm"}
ORDER = {"core": 0, "generators": 1, "runtime": 2, "command line": 3}

GENERATORS = {
    "tunefleet.launch",
    "tunefleet.launch.command",
    "tunefleet.launch.compat",
    "tunefleet.launch.compare",
    "tunefleet.launch.hf_compat",
    "tunefleet.launch.loading",
    "tunefleet.launch.memory",
    "tunefleet.launch.params",
    "tunefleet.launch.plan",
    "tunefleet.launch.preflight",
    "tunefleet.launch.prep_report",
    "tunefleet.launch.templates",
    "tunefleet.slurm",
    "tunefleet.slurm.sbatch",
}
COMMAND_LINE = {
    "tunefleet.launch.cli",
    "tunefleet.launch.join",
    "tunefleet.launch.plan_inputs",
    "tunefleet.launch.workstation",
    "tunefleet.slurm.cli",
    "tunefleet.slurm.job",
    "tunefleet.slurm.status",
    "tunefleet.slurm.submit",
}


DATA_LAYERS = {
    "loading": 0,
    "chat": 1,
    "skeleton": 1,
    "counts": 2,
    "tokenization": 2,
    "batched": 2,
    "progress": 3,
    "parallel": 3,
}
"""The layers inside the runtime's `distributed/data/` package: loading <- chat spans <-
tokenization (the per-row reference, the counts, the batched path) <- the multi-process build."""


def layer_of(module: str) -> str:
    if module == "tunefleet.launch.core" or module.startswith("tunefleet.launch.core."):
        return "core"
    if module in GENERATORS:
        return "generators"
    if module in COMMAND_LINE:
        return "command line"
    if module == "tunefleet.distributed" or module.startswith("tunefleet.distributed."):
        return "runtime"
    raise AssertionError(f"{module} has no layer: add it to tests/test_layers.py")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def import_edges() -> set[tuple[str, str]]:
    """(importer, imported) for every import of a tunefleet module, at any scope."""
    known = modules()
    edges = set()
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunefleet"):
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [
                    f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known
                ]
                targets = targets or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("tunefleet")]
            edges.update((name, t) for t in targets if t in known and t != name)
    return edges


def test_every_module_has_a_layer() -> None:
    for name in modules():
        layer_of(name)


def test_no_module_imports_a_higher_layer() -> None:
    upward = [
        f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
        for a, b in sorted(import_edges())
        if ORDER[layer_of(b)] > ORDER[layer_of(a)]
    ]
    assert upward == []


def test_the_core_imports_nothing_else_of_tunefleet() -> None:
    outside = [f"{a} imports {b}" for a, b in sorted(import_edges()) if layer_of(a) == "core" != layer_of(b)]
    assert outside == []


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in import_edges():
        graph.setdefault(a, set()).add(b)
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_data_package_keeps_its_layers() -> None:
    """Inside distributed/data/: no module imports a higher one; every module has a layer."""
    package = "tunefleet.distributed.data."
    names = [m[len(package) :] for m in modules() if m.startswith(package)]
    assert sorted(names) == sorted(DATA_LAYERS), "give the new module its layer in DATA_LAYERS"
    upward = [
        f"{a} imports {b}"
        for a, b in sorted(import_edges())
        if a.startswith(package)
        and b.startswith(package)
        and DATA_LAYERS[b[len(package) :]] > DATA_LAYERS[a[len(package) :]]
    ]
    assert upward == []


def test_the_layer_test_sees_a_violation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above can fail: an upward edge planted in the edge list is reported."""
    planted = {("tunefleet.launch.core.recipe", "tunefleet.launch.cli")}
    monkeypatch.setattr(sys.modules[__name__], "import_edges", lambda: planted)
    with pytest.raises(AssertionError, match="launch.core.recipe \\(core\\) imports tunefleet.launch.cli"):
        test_no_module_imports_a_higher_layer()


def test_the_training_entrypoint_loads_no_command_line_module() -> None:
    """Importing the entrypoint loads the core and the runtime, not the CLI or the launcher."""
    code = (
        "import sys, tunefleet.distributed.sft\n"
        "print(sorted(m for m in sys.modules if m.startswith('tunefleet')))\n"
    )
    loaded = eval(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert [m for m in loaded if m in COMMAND_LINE] == []
