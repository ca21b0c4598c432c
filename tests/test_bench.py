"""The benchmark package: one file per benchmark, `BENCHES` and `PLOTS` as `mmdistill bench` reads them, and no
benchmark importing an objective's module (the objectives are reached through the registry).

    python -m pytest tests/test_bench.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import mmdistill.bench as bench_pkg
from mmdistill.bench import BENCHES, PLOTS

BENCH_DIR = Path(bench_pkg.__file__).parent


def test_benches_and_plots_name_every_benchmark():
    assert set(BENCHES) == {"flow-sampling", "libero-throughput", "text-step", "text-loss-memory", "memory"}
    assert set(PLOTS) == {"text-step", "text-loss-memory"}
    for name, fn in BENCHES.items():
        assert fn.__module__ == f"mmdistill.bench.{name.replace('-', '_')}", f"{name} lives in its own file"
    assert all(callable(fn) for fn in [*BENCHES.values(), *PLOTS.values()])


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_benchmark_imports_an_objective_module():
    files = sorted(BENCH_DIR.glob("*.py"))
    assert {f.stem for f in files} >= {
        "__init__",
        "common",
        "flow_sampling",
        "libero_throughput",
        "text_step",
        "text_loss_memory",
    }
    for f in files:
        bad = sorted(
            m for m in _imported_modules(f) if m == "mmdistill.objectives" or m.startswith("mmdistill.objectives.")
        )
        assert not bad, f"{f.name} imports {bad}: take objectives from mmdistill.registry.OBJECTIVES"
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        assert doc and ("mmdistill" in doc.splitlines()[-1] or "python" in doc.splitlines()[-1]), (
            f"{f.name}: docstring ends with a command"
        )
