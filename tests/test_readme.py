"""The README's Python examples run as written, in order, in one namespace.

A block may use names it leaves to the reader (``x_batch``, ``loader``); ``GIVEN`` supplies
them just before that block, so a change to the API that breaks an example breaks this test.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpunet
import gpunet.train
from gpunet.backend import probe_cuda

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
CUDA_LINE = 't.to("cuda"); '  # the devices example's one line that needs a GPU


def _labels(n: int) -> gpunet.Tensor:
    return gpunet.tensor(np.random.default_rng(n).integers(0, 10, n))


def _loader(features: int, dtype: Any) -> list[tuple[gpunet.Tensor, gpunet.Tensor]]:
    return [(gpunet.randn(8, features, dtype=dtype), _labels(8)) for _ in range(3)]


# block index -> the names it takes from the reader, made from what ran before it
GIVEN: dict[int, Callable[[dict], dict]] = {
    1: lambda ns: {"x_batch": gpunet.randn(16, 3), "y_batch": gpunet.randn(16, 1)},
    2: lambda ns: {
        "a": gpunet.randn(3),
        "b": gpunet.randn(3),
        "u": gpunet.tensor(1.0),
        "v": gpunet.ones_like(ns["x"]),
    },
    4: lambda ns: {"x": gpunet.randn(8, 64), "labels": _labels(8)},
    # the model is float64 after the previous block's model.to(gpunet.float64)
    5: lambda ns: {"loader": _loader(64, gpunet.float64)},
    6: lambda ns: {"sched": gpunet.optim.lr_scheduler.LinearLR(ns["opt"], 0.5, total_iters=2)},
    11: lambda ns: {"x": gpunet.randn(8, 784), "y": _labels(8)},
}


def test_the_readme_has_the_examples_this_test_knows() -> None:
    """A new example needs its reader-supplied names here (or none)."""
    assert len(BLOCKS) == 12, "README's Python examples changed: update GIVEN in this test"
    assert CUDA_LINE in BLOCKS[3]


FEW_EPOCHS = 3  # the Training example's 100-epoch fit is what `make train` runs in CI


def test_the_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples save checkpoints in the working directory
    real_fit, fits = gpunet.train.fit, []

    def fit(*args: Any, **kwargs: Any) -> gpunet.train.History:
        """The README's fit as written, on a few epochs: the example's own import gets this."""
        kwargs["epochs"] = min(kwargs.get("epochs", FEW_EPOCHS), FEW_EPOCHS)
        fits.append(real_fit(*args, **kwargs))
        return fits[-1]

    monkeypatch.setattr(gpunet.train, "fit", fit)
    gpunet.manual_seed(0)
    ns: dict[str, Any] = {}
    for i, code in enumerate(BLOCKS):
        ns.update(GIVEN.get(i, lambda ns: {})(ns))
        if CUDA_LINE in code and not probe_cuda().available:
            code = code.replace(CUDA_LINE, "")  # run the rest; the line itself is below
        exec(compile(code, f"README.md python block {i}", "exec"), ns)
    assert (tmp_path / "run.safetensors").exists() and (tmp_path / "model.safetensors").exists()
    assert ns["meta"]["epoch"] == 3
    for history in fits:  # Training's example, then Data parallelism's in a world of one
        assert len(history.train_loss) == FEW_EPOCHS and history.val_accuracy[-1] > 0.8


def test_the_readme_cuda_line_says_why_without_a_gpu() -> None:
    if probe_cuda().available:
        pytest.skip("a CUDA device answers: the examples test ran the line")
    with pytest.raises(RuntimeError, match="cuda"):
        gpunet.zeros(3).to("cuda")


@pytest.mark.parametrize("marker", ["gpunet.amp.GradScaler()", "dist.DistributedOptimizer("])
def test_the_readme_examples_that_import_run_on_their_own(
    marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Mixed precision and Data parallelism examples start with their imports, so a reader
    copies them alone: they must not lean on names an earlier block defined."""
    (code,) = [b for b in BLOCKS if marker in b]
    real_fit = gpunet.train.fit
    monkeypatch.setattr(
        gpunet.train, "fit", lambda *a, **k: real_fit(*a, **{**k, "epochs": 1, "progress": False})
    )
    exec(compile(code, f"README.md block with {marker}", "exec"), {})
