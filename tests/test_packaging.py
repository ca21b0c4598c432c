"""Packaging: the wheel holds only mmdistill/...; bare `objectives` / `modalities` imports fail clearly."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build_dir = tmp_path_factory.mktemp("src")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        cwd=build_dir,
    )
    (whl,) = out.glob("mmdistill-*.whl")
    return whl


def test_wheel_holds_only_mmdistill(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"mmdistill", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    assert "mmdistill/objectives/opd.py" in names
    assert "mmdistill/modalities/text/adapter.py" in names
    assert "mmdistill/modalities/text/tasks/arith.py" in names
    assert "mmdistill/configs/text/quickstart.yaml" in names
    assert not any(n.startswith(("objectives/", "modalities/", "configs/", "tests/")) for n in names)


@pytest.mark.parametrize("name", ["objectives", "modalities"])
def test_bare_import_fails_with_instructions(name):
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"mmdistill.{name}" in proc.stderr and "ImportError" in proc.stderr


def test_package_imports_work_from_anywhere(tmp_path):
    code = "import mmdistill.objectives.opd, mmdistill.modalities.text.adapter; from mmdistill.kernels import generalized_jsd; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
