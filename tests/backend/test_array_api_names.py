"""Every ``xp.<name>`` the package calls exists where it runs, checked without a GPU.

The generic backend, the fused ops and the optimizers reach the array library only as ``xp``
(NumPy, CuPy, or array-api-strict in the tests). A name that CuPy lacks would surface as an
AttributeError on the first GPU run of that path (CuPy 13 has no ``permute_dims``, ``concat``,
``pow``, ``astype``; CuPy 14.0 keeps ``matrix_transpose`` out of its namespace; 14.1 is the
first with all five). So the names are read from the source with ``ast``, never listed by
hand, and looked up on the installed CuPy (importing CuPy needs no device) and, for the code
that runs on array-api-strict, there too; and the extras ask for that CuPy at least.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "gpunet"
CI = os.environ.get("CI") == "true"
CUPY_FLOOR = (14, 1)  # the first CuPy whose namespace holds every name the package calls
# Where ``xp`` is a peer framework's namespace (jax.numpy, torch), not gpunet's array library.
NOT_OURS = ("bench/",)
# The array-API code, which the tests also run on array-api-strict.
ARRAY_API = ("backend/generic.py", "backend/fused.py", "optim/")


def xp_names(source: str) -> set[str]:
    """Attributes read from ``xp`` or ``<anything>.xp``: ``xp.sum``, ``self.xp.where``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            v = node.value
            if (isinstance(v, ast.Name) and v.id == "xp") or (
                isinstance(v, ast.Attribute) and v.attr == "xp"
            ):
                names.add(node.attr)
    return names


def called(prefixes: tuple[str, ...] = ("",)) -> dict[str, set[str]]:
    """name -> the files (relative to gpunet/) that call ``xp.<name>``."""
    out: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(NOT_OURS) or not rel.startswith(prefixes):
            continue
        for name in xp_names(path.read_text()):
            out.setdefault(name, set()).add(rel)
    return out


def _import_or_skip(module: str, why: str):
    try:
        return __import__(module)
    except ImportError as e:
        if CI:
            pytest.fail(
                f"{module} is not installed ({e}); the dev extra installs it, and under "
                f"CI=true {why} must run"
            )
        pytest.skip(f"{module} is not installed: {e}")


def test_the_scan_finds_the_calls_it_must() -> None:
    """The scan itself: it sees ``self.xp.<name>`` and bare ``xp.<name>`` in the files."""
    names = called()
    assert {"matrix_transpose", "permute_dims", "concat", "pow", "astype"} <= set(names)
    assert "backend/generic.py" in names["matrix_transpose"]
    assert "optim/clip.py" in names["astype"]
    assert xp_names("def f(self, xp):\n    xp.a(self.xp.b, other.c)\n") == {"a", "b"}


def test_every_xp_name_exists_on_the_installed_cupy() -> None:
    cupy = _import_or_skip("cupy", "the CuPy API check")
    missing = {n: sorted(f) for n, f in called().items() if not hasattr(cupy, n)}
    assert not missing, (
        f"CuPy {cupy.__version__} lacks {missing}: a GPU run of those files would raise "
        "AttributeError; raise the cupy floor in pyproject.toml or use another name"
    )


def test_the_array_api_code_calls_only_what_array_api_strict_has() -> None:
    xps = _import_or_skip("array_api_strict", "the array API check")
    missing = {n: sorted(f) for n, f in called(ARRAY_API).items() if not hasattr(xps, n)}
    assert not missing, f"array-api-strict lacks {missing}"


def _floor(requirement: str) -> tuple[int, ...]:
    m = re.fullmatch(r"cupy-cuda1[23]x>=([\d.]+)", requirement)
    assert m, f"the cupy requirement {requirement!r} must read cupy-cuda1Nx>=VERSION"
    return tuple(int(p) for p in m.group(1).split("."))


def test_the_extras_ask_for_a_cupy_that_has_every_name() -> None:
    cupys = re.findall(r'"(cupy[^"]*)"', (ROOT / "pyproject.toml").read_text())
    assert len(cupys) >= 3  # cuda12, cuda13 and dev
    for requirement in cupys:
        assert _floor(requirement) >= CUPY_FLOOR, requirement
    cupy = _import_or_skip("cupy", "the CuPy version check")
    installed = tuple(int(p) for p in re.findall(r"\d+", cupy.__version__)[:2])
    assert installed >= CUPY_FLOOR, f"installed CuPy {cupy.__version__} is below the floor"
