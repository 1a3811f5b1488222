"""The built wheel: it carries the CUDA sources (kernels/ -> gpunet/_kernels/) and every
package under gpunet/, and an installed gpunet finds its kernels there.

The wheel is built offline from a copy of the sources (pip wheel --no-build-isolation, with
the setuptools of this environment), so the checkout gains no build/ or egg-info.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpunet.backend import kernels as K

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        import setuptools
    except ImportError:
        setuptools = None
    if setuptools is None or int(setuptools.__version__.split(".")[0]) < 68:
        reason = "building the wheel offline needs setuptools>=68 in this environment"
        if CI:
            pytest.fail(reason)
        pytest.skip(reason)
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("gpunet", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    cmd += ["--no-index", "-q", "-w", str(out), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    (built,) = out.glob("gpunet-*.whl")
    return built


def test_wheel_contains_the_kernel_sources(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in sorted((ROOT / "kernels").iterdir()):
        if f.suffix in (".cu", ".cuh", ".h"):
            assert f"gpunet/_kernels/{f.name}" in names, f"{f.name} is not in the wheel"
    assert {f"gpunet/_kernels/{s}" for s in (*K.SOURCES, K.HEADER)} <= names


def test_wheel_contains_the_bundled_digits_and_their_attribution(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gpunet/_data/digits.npz", "gpunet/_data/DIGITS.md"} <= names


def test_wheel_contains_every_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in sorted((ROOT / "gpunet").rglob("__init__.py")):
        rel = init.relative_to(ROOT).as_posix()
        assert rel in names, (
            f"{rel} is not in the wheel: add '{init.parent.relative_to(ROOT).as_posix()}' "
            "(dots for slashes) to [tool.setuptools] packages in pyproject.toml"
        )


def test_installed_package_finds_its_kernels(wheel: Path, tmp_path: Path) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from gpunet.backend import kernels; "
        "print(kernels.kernel_dir()); print(len(kernels.source('elementwise.cu')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    where, size = done.stdout.split()
    assert Path(where) == tmp_path / "gpunet" / "_kernels"
    assert int(size) == len(K.source("elementwise.cu"))
