"""The README's layer drawing is the import graph: every import in the package (at module level
and inside functions) goes down the layers, save the one declared exception.

    user code, nn, optim, train, ...   (6: each other and anything below; the package itself,
                                        ``import gpunet``, only inside functions)
    ops -> activations -> autodiff -> tensor
                                       (the tape: 5, 4, 3, 2; ops re-exports the activations)
    primitives                         (1: the cards and their rules)
    backend, dtypes                    (0)

The exception: the tape and the rules call the layer above at call time. ``tensor``,
``autodiff`` and the ``primitives`` modules may ``import gpunet`` and use ``gpunet.ops`` or
``gpunet.autodiff`` inside functions (rules, methods), never while the module loads. Layers
above the tape reach the primitives as the package (``gpunet.primitives``: the cards), never
a family module such as ``gpunet.primitives.linalg``.

Inside a package its modules import each other freely, save ``gpunet.capture``, whose modules
import one way, each only those before it: recording, passes, program, step, the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gpunet"
TAPE = {"gpunet.tensor": 2, "gpunet.autodiff": 3, "gpunet.activations": 4, "gpunet.ops": 5}
USER = 6  # nn, optim, train, cli, ...: everything above the tape
CALL_TIME = ("gpunet.tensor", "gpunet.autodiff", "gpunet.primitives")
CAPTURE = ("recording", "passes", "program", "step", "")  # gpunet.capture's, in import order


def layer(module: str) -> int:
    if module == "gpunet":
        return USER + 1
    if module == "gpunet.backend" or module.startswith(("gpunet.backend.", "gpunet.dtypes")):
        return 0
    if module.startswith("gpunet.primitives"):
        return 1
    return TAPE.get(module, USER)


def _family(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _capture_rank(module: str) -> int:
    """Where a module of ``gpunet.capture`` stands in its import order (a new one: nowhere)."""
    name = module.removeprefix("gpunet.capture").removeprefix(".")
    return CAPTURE.index(name) if name in CAPTURE else -1


def allowed(src: str, dst: str, names: tuple, in_function: bool) -> bool:
    """May module ``src`` import ``dst`` (``names`` from it, for ``from dst import ...``)?"""
    if dst == "gpunet":  # the root: the call-time exception, user-level code at call time
        if src.startswith(CALL_TIME) or set(names) <= {"__version__"}:
            return True  # (the version string is a constant)
        return in_function and layer(src) == USER
    if _family(src) == _family(dst) == "gpunet.capture" and src != dst:
        return 0 <= _capture_rank(dst) < _capture_rank(src)  # (one way: no cycle)
    if _family(src) == _family(dst) or src == dst:
        return True  # within one package (backend, primitives, nn, optim) or module
    if dst.startswith("gpunet.primitives.") and layer(src) >= USER:
        return False  # above the tape: the cards through gpunet.primitives, the rest via ops
    ls, ld = layer(src), layer(dst)
    return ld < ls or (ls == ld == USER)


def imports(module: str, source: str, is_package: bool) -> list[tuple[str, tuple, int, bool]]:
    """(imported module, names, line, inside a function) for every gpunet import in
    ``source``, at any depth (``if TYPE_CHECKING:`` blocks never run and are skipped)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    out: list[tuple[str, tuple, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gpunet"):
                    out.append((a.name, ("*",), node.lineno, in_function))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.startswith("gpunet"):
                names = tuple(a.name for a in node.names)
                subs = [n for n in names if _is_module(f"{base}.{n}")]
                out.extend((f"{base}.{n}", (), node.lineno, in_function) for n in subs)
                rest = tuple(n for n in names if n not in subs)
                if rest:
                    out.append((base, rest, node.lineno, in_function))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def root_used_at_load(source: str) -> list[int]:
    """Lines where module-level code (outside functions and lambdas) reads ``gpunet.<x>``."""
    lines = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "gpunet"
        ):
            lines.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return lines


def violations(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every forbidden edge in ``{module: (source, is_package)}``, as 'file:line src -> dst'."""
    found = []
    for module, (source, is_package) in sorted(sources.items()):
        for dst, names, line, in_function in imports(module, source, is_package):
            if not allowed(module, dst, names, in_function):
                found.append(f"{module}:{line} {module} -> {dst}")
        if module.startswith(CALL_TIME):
            found += [
                f"{module}:{n} reads gpunet.<x> while loading" for n in root_used_at_load(source)
            ]
    return found


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        sources[".".join(parts)] = (path.read_text(), rel.name == "__init__")
    return sources


def test_the_package_imports_only_down_the_layers() -> None:
    sources = package_sources()
    assert "gpunet.autodiff" in sources and "gpunet.primitives.linalg" in sources
    assert violations(sources) == []


@pytest.mark.parametrize(
    ("module", "source", "edge"),
    [
        ("gpunet.backend.fake", "from .. import ops\n", "gpunet.backend.fake -> gpunet.ops"),
        (
            "gpunet.backend.fake",
            "def f():\n    from ..autodiff import bind\n",
            "-> gpunet.autodiff",
        ),
        ("gpunet.tensor", "from .ops import add\n", "gpunet.tensor -> gpunet.ops"),
        ("gpunet.autodiff", "from . import ops\n", "gpunet.autodiff -> gpunet.ops"),
        ("gpunet.activations", "from .ops import add\n", "gpunet.activations -> gpunet.ops"),
        ("gpunet.primitives.fake", "from ..tensor import Tensor\n", "-> gpunet.tensor"),
        (
            "gpunet.nn.fake",
            "from ..primitives.linalg import linear\n",
            "-> gpunet.primitives.linalg",
        ),
        ("gpunet.nn.fake", "import gpunet\n", "gpunet.nn.fake -> gpunet"),
        ("gpunet.primitives.fake", "import gpunet\nadd = gpunet.ops.add\n", "while loading"),
        (
            "gpunet.capture.recording",
            "from .step import capture\n",
            "gpunet.capture.recording -> gpunet.capture.step",
        ),
        (
            "gpunet.capture.passes",
            "def f():\n    from .program import _Program\n",
            "-> gpunet.capture.program",
        ),
        ("gpunet.capture.fake", "from .recording import _Entry\n", "-> gpunet.capture.recording"),
    ],
)
def test_a_new_forbidden_edge_is_found(module: str, source: str, edge: str) -> None:
    found = violations({module: (source, False)})
    assert len(found) == 1 and edge in found[0], found


def test_the_allowed_edges_pass() -> None:
    fine = {
        "gpunet.nn.fake": (
            "from .. import ops, primitives as P\nfrom ..ops import linear_fusable\n",
            False,
        ),
        "gpunet.ops": (
            "from .autodiff import bind\nfrom .primitives.linalg import linear_fusable\n"
            "from .activations import relu\n",
            False,
        ),
        "gpunet.primitives.fake": ("import gpunet\nf = lambda g: gpunet.ops.neg(g)\n", False),
        "gpunet.backend.fake": ("def info():\n    from .. import __version__\n", False),
        "gpunet.capture.step": (
            "from ..autodiff import CaptureError\nfrom .program import _Program\n"
            "from .recording import _Entry\n",
            False,
        ),
        "gpunet.capture": ("from .step import capture\n", True),
    }
    assert violations(fine) == []
