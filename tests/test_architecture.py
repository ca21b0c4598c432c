"""The architecture's nevers, checked on the source: every import in the package, including
imports inside functions and `importlib.import_module("...")` strings.

- objectives never import modalities; modalities never import objectives;
- the core (`mmdistill/*.py`) imports no module of objectives or modalities (it only loads the two
  packages); benchmarks (`mmdistill/bench/`) may name modalities, never objectives;
- no import cycle between modalities (text imports no other modality);
- no `registered*.py` file; no capability probing (`hasattr`, `getattr` with a default) in the core.

    python -m pytest tests/test_architecture.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {
    "mmdistill": ROOT / "mmdistill",
    "mmdistill.objectives": ROOT / "objectives",
    "mmdistill.modalities": ROOT / "modalities",
}
PACKAGES = ("mmdistill.objectives", "mmdistill.modalities")


def _module_name(path: Path) -> str:
    for pkg, root in sorted(PARTS.items(), key=lambda kv: -len(kv[0])):
        if path.is_relative_to(root):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            return ".".join([pkg, *parts])
    raise AssertionError(path)


def _files() -> list[Path]:
    out = []
    for pkg, root in PARTS.items():
        for p in root.rglob("*.py"):
            if pkg == "mmdistill" and p.relative_to(root).parts[0] in ("objectives", "modalities", "configs"):
                continue  # symlinks or copies of the shipped folders, if any
            out.append(p)
    return sorted(out)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, wherever it stands."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".") if is_pkg else here.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _part(module: str) -> str:
    """core | bench | objectives | modalities.<name> | external"""
    if module.startswith("mmdistill.objectives"):
        return "objectives"
    if module.startswith("mmdistill.modalities"):
        rest = module.split(".")
        return "modalities" if len(rest) == 2 else f"modalities.{rest[2]}"
    if module.startswith("mmdistill.bench"):
        return "bench"
    if module == "mmdistill" or module.startswith("mmdistill."):
        return "core"
    return "external"


def _is_module_of(target: str, imported: str) -> bool:
    return imported == target or imported.startswith(target + ".")


def violations() -> list[str]:
    bad = []
    for path in _files():
        src = _part(_module_name(path))
        rel = path.relative_to(ROOT)
        for line, mod in imports_of(path):
            dst = _part(mod)
            where = f"{rel}:{line} imports {mod}"
            if src == "objectives" and dst.startswith("modalities"):
                bad.append(f"{where} (objectives -> modalities)")
            elif src.startswith("modalities") and dst == "objectives":
                bad.append(f"{where} (modalities -> objectives)")
            elif src == "core" and (dst == "objectives" or dst.startswith("modalities")) and mod not in PACKAGES:
                bad.append(f"{where} (core -> a module of objectives or modalities)")
            elif src == "bench" and dst == "objectives" and mod not in PACKAGES:
                bad.append(f"{where} (bench -> objectives)")
    return bad


def modality_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _files():
        src = _part(_module_name(path))
        if not src.startswith("modalities."):
            continue
        for _, mod in imports_of(path):
            dst = _part(mod)
            if dst.startswith("modalities.") and dst != src:
                graph.setdefault(src, set()).add(dst)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                cycles.append(path + [nxt])
            elif nxt not in path:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_the_walker_sees_imports_inside_functions(tmp_path):
    f = ROOT / "objectives" / "_probe_for_test.py"
    try:
        f.write_text(
            "def f():\n    from mmdistill.modalities.text import adapter\n    import importlib\n"
            "    importlib.import_module('mmdistill.modalities.flow')\n"
        )
        found = [m for _, m in imports_of(f)]
        assert "mmdistill.modalities.text" in found and "mmdistill.modalities.flow" in found
        assert any("_probe_for_test.py" in v for v in violations())
    finally:
        f.unlink()


def test_relative_imports_resolve():
    init = ROOT / "objectives" / "__init__.py"
    assert _module_name(init) == "mmdistill.objectives"
    assert _module_name(ROOT / "modalities" / "text" / "adapter.py") == "mmdistill.modalities.text.adapter"


def test_no_forbidden_imports():
    bad = violations()
    assert not bad, "architecture nevers broken:\n" + "\n".join(bad)


def test_no_cycles_between_modalities():
    graph = modality_graph()
    assert not _cycles(graph), f"import cycles between modalities: {_cycles(graph)}"
    assert not graph.get("modalities.text"), (
        f"the text modality must import no other modality: {graph.get('modalities.text')}"
    )


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"modalities.a": {"modalities.b"}, "modalities.b": {"modalities.a"}})


def test_no_registered_files():
    left = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("objectives/**/registered*.py"))
    left += sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("modalities/**/registered*.py"))
    assert not left, f"one algorithm (or task) per file, registered where it lives: {left}"


def probes_in_core() -> list[str]:
    """`hasattr(x, ...)` and three-argument `getattr(x, name, default)` calls in the core: capability probing."""
    found = []
    for path in sorted((ROOT / "mmdistill").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_capability_probing_in_the_core():
    assert not probes_in_core(), "the core calls Protocol members only:\n" + "\n".join(probes_in_core())


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_register_their_own_modules(package):
    """Every module of the two packages that registers something (`.register(`) is imported by its
    package's __init__ (directly or through a sub-package's), so none is silently left out of the
    registries.  Modules that register nothing (e.g. ones behind a heavy optional dependency) may load lazily."""
    import importlib
    import sys

    importlib.import_module(package)
    root = PARTS[package]
    missing = []
    for p in sorted(root.rglob("*.py")):
        name = _module_name(p)
        if p.name.startswith("_") and p.name != "__init__.py":
            continue
        if name not in sys.modules and ".register(" in p.read_text():
            missing.append(name)
    optional = {m for m in missing if m.startswith("mmdistill.modalities.flow")}  # without the flow extra
    try:
        import diffusers  # noqa: F401

        optional = set()
    except ImportError:
        pass
    assert not set(missing) - optional, f"modules not imported by their package: {sorted(set(missing) - optional)}"
