"""Checkpoints in the safetensors format: a JSON header and raw little-endian tensors, so a
file loads without running code (never pickle) and opens in any safetensors reader.

``save(path, model, optimizer, **metadata)`` writes the model's ``state_dict()`` as tensors
``model.<name>``, the optimizer's buffers as ``optimizer.<param index>.<buffer>``, and
everything else in the header as JSON strings: the optimizer's hyperparameters and step counts
under ``gpunet.optimizer``, each metadata keyword under its own name. The write is atomic:
a temporary file in the same directory, flushed and fsynced, then renamed over the target.
``load`` checks every name and shape first and raises one error listing every mismatch before
it changes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import safe_open

FORMAT = "gpunet-checkpoint-1"
_FORMAT_KEY, _OPTIM_KEY = "gpunet.format", "gpunet.optimizer"


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or optimizer it is loaded into."""


def save(path: str | os.PathLike, model: Any, optimizer: Any = None, **metadata: Any) -> None:
    """Write ``model`` (anything with ``state_dict()``), optionally ``optimizer``, and
    JSON-serializable ``metadata`` to ``path`` atomically."""
    tensors = {f"model.{k}": _host(v) for k, v in model.state_dict().items()}
    header = {_FORMAT_KEY: FORMAT}
    for key, value in metadata.items():
        if key.startswith("gpunet."):
            raise ValueError(f"metadata keys starting with 'gpunet.' are reserved, got {key!r}")
        header[key] = json.dumps(value)
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for index, state in sd["state"].items():
            for name, value in state.items():
                if value is None or isinstance(value, (bool, int, float)):
                    scalars.setdefault(str(index), {})[name] = value
                else:
                    tensors[f"optimizer.{index}.{name}"] = _host(value)
        header[_OPTIM_KEY] = json.dumps(
            {"type": type(optimizer).__name__, "param_groups": sd["param_groups"], "state": scalars}
        )
    _write_atomically(Path(path), safetensors.numpy.save(tensors, metadata=header))


def load(path: str | os.PathLike, model: Any = None, optimizer: Any = None) -> dict[str, Any]:
    """Load what ``save`` wrote into ``model`` and ``optimizer`` (either may be None) and
    return the metadata keywords. Raises CheckpointError, listing every missing, unexpected
    or mis-shaped entry, before anything is changed."""
    with safe_open(str(path), framework="np") as f:
        header = f.metadata() or {}
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    if header.get(_FORMAT_KEY) != FORMAT:
        raise CheckpointError(f"{path}: not a gpunet checkpoint (no {_FORMAT_KEY} = {FORMAT})")
    problems: list[str] = []
    if model is not None:
        problems += _check_model(model, shapes)
    saved_optim = json.loads(header[_OPTIM_KEY]) if _OPTIM_KEY in header else None
    if optimizer is not None:
        if saved_optim is None:
            problems.append("the checkpoint holds no optimizer state")
        else:
            problems += _check_optimizer(optimizer, saved_optim, shapes)
    if problems:
        raise CheckpointError(f"cannot load {path}:\n  " + "\n  ".join(problems))
    tensors = safetensors.numpy.load_file(str(path))
    if model is not None:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(saved_optim, tensors))
    return {k: json.loads(v) for k, v in header.items() if not k.startswith("gpunet.")}


# ---------------------------------------------------------------- checks
def _check_model(model: Any, shapes: dict[str, tuple]) -> list[str]:
    own = {f"model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: s for k, s in shapes.items() if k.startswith("model.")}
    problems = [f"missing from the checkpoint: {k}" for k in own if k not in saved]
    problems += [f"not in the model: {k}" for k in saved if k not in own]
    problems += [
        f"{k}: shape {saved[k]} in the checkpoint, {s} in the model"
        for k, s in own.items()
        if k in saved and saved[k] != s
    ]
    return problems


def _check_optimizer(optimizer: Any, saved: dict[str, Any], shapes: dict[str, tuple]) -> list[str]:
    groups = optimizer.state_dict()["param_groups"]
    saved_groups = saved["param_groups"]
    if type(optimizer).__name__ != saved["type"]:
        return [
            f"the checkpoint holds {saved['type']} state, the optimizer is "
            f"{type(optimizer).__name__}"
        ]
    if len(groups) != len(saved_groups):
        return [
            f"{len(saved_groups)} param groups in the checkpoint, {len(groups)} in the optimizer"
        ]
    problems = []
    for i, (g, s) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(s["params"]):
            problems.append(
                f"param group {i}: {len(s['params'])} parameters in the checkpoint, "
                f"{len(g['params'])} in the optimizer"
            )
    problems += optimizer.group_problems(saved_groups, "the checkpoint")
    if problems:
        return problems
    params = {
        s: p
        for g, m in zip(saved_groups, optimizer.param_groups)
        for s, p in zip(g["params"], m["params"])
    }
    for name, shape in shapes.items():
        if not name.startswith("optimizer."):
            continue
        index = int(name.split(".")[1])
        p = params.get(index)
        if p is None:
            problems.append(f"{name}: no parameter {index} in the optimizer")
        elif shape != tuple(p.shape):
            problems.append(
                f"{name}: shape {shape} in the checkpoint, {tuple(p.shape)} in the optimizer"
            )
    return problems


def _optimizer_state(saved: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``state_dict`` that ``save`` took apart, put back together."""
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in saved["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, buf = name.split(".", 2)
            state.setdefault(int(index), {})[buf] = value
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in saved["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- writing
def _host(value: Any) -> np.ndarray:
    """A tensor or array as a C-contiguous NumPy array (copied from a GPU)."""
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    elif hasattr(value, "get"):  # CuPy
        value = value.get()
    return np.ascontiguousarray(value)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``: a
    reader sees the old file or the new one, never half of one; a failure leaves no temp."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode the file it replaces had
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable (POSIX; not possible on Windows)
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
