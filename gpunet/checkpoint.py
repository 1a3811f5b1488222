"""Checkpoints in the safetensors format: a JSON header and raw little-endian tensors, so a
file loads without running code (never pickle) and opens in any safetensors reader.

``save(path, model, optimizer, **metadata)`` writes the model's ``state_dict()`` as tensors
``model.<name>``, the optimizer's buffers as ``optimizer.<param index>.<buffer>``, the random
generators' device states as ``rng.<device>``, and everything else in the header as JSON
strings: the optimizer's hyperparameters and step counts under ``gpunet.optimizer``, the
default generator's seed and host state under ``gpunet.rng``, each metadata keyword under its
own name. The write is atomic: a temporary file in the same directory, flushed and fsynced,
then renamed over the target. ``load`` reads the header itself, so a file that is missing,
empty, truncated, corrupt or not safetensors is a ``CheckpointError`` naming the path and
what is wrong; it checks every name and shape and raises one error listing every mismatch
before it changes anything; then it restores the weights, the optimizer and the generators
(so dropout continues exactly; a checkpoint without ``gpunet.rng`` leaves them alone).
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

from . import random
from .tensor import Tensor

FORMAT = "gpunet-checkpoint-1"
_FORMAT_KEY, _OPTIM_KEY, _RNG_KEY = "gpunet.format", "gpunet.optimizer", "gpunet.rng"
_RNG_PREFIX, _RANKS_PREFIX = "rng.", "rng_ranks."


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model or optimizer it is loaded into."""


def save(
    path: str | os.PathLike,
    model: Any,
    optimizer: Any = None,
    *,
    rng_state: dict[str, Any] | None = None,
    rng_ranks: list[dict[str, Any]] | None = None,
    **metadata: Any,
) -> None:
    """Write ``model`` (anything with ``state_dict()``), optionally ``optimizer``, the state of
    ``gpunet``'s default random generator (``rng_state``, one taken earlier with
    ``default_generator.get_state()``, or the current one), every data-parallel rank's
    generator state (``rng_ranks``, in rank order: ``load`` returns it as ``rng_ranks``), and
    JSON-serializable ``metadata`` to ``path`` atomically."""
    tensors = {f"model.{k}": _host(v) for k, v in model.state_dict().items()}
    rng = dict(random.default_generator.get_state() if rng_state is None else rng_state)
    for dev, state in rng.pop("devices").items():
        tensors[_RNG_PREFIX + dev] = state
    header = {_FORMAT_KEY: FORMAT, _RNG_KEY: json.dumps(rng)}
    if rng_ranks is not None:  # host streams in the header, device streams as tensors
        metadata["rng_ranks"] = [{k: v for k, v in r.items() if k != "devices"} for r in rng_ranks]
        for r, state in enumerate(rng_ranks):
            for dev, array in state.get("devices", {}).items():
                tensors[f"{_RANKS_PREFIX}{r}.{dev}"] = array
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
        groups = [{k: _plain(v) for k, v in g.items()} for g in sd["param_groups"]]
        header[_OPTIM_KEY] = json.dumps(
            {"type": type(optimizer).__name__, "param_groups": groups, "state": scalars}
        )
    write_atomically(Path(path), safetensors.numpy.save(tensors, metadata=header))


def load(
    path: str | os.PathLike, model: Any = None, optimizer: Any = None, rng: bool = True
) -> dict[str, Any]:
    """Load what ``save`` wrote into ``model`` and ``optimizer`` (either may be None), restore
    the default random generator (unless ``rng=False``) and return the metadata keywords.
    Raises CheckpointError, naming the file and what is wrong with it, or listing every
    missing, unexpected or mis-shaped entry, before anything is changed."""
    path = Path(path)
    header, shapes = _read_header(path)
    if header.get(_FORMAT_KEY) != FORMAT:
        raise CheckpointError(f"{path}: not a gpunet checkpoint (no {_FORMAT_KEY} = {FORMAT})")
    problems: list[str] = []
    if model is not None:
        problems += _check_model(model, shapes)
    saved_optim = _json(path, header, _OPTIM_KEY)
    if optimizer is not None:
        if saved_optim is None:
            problems.append("the checkpoint holds no optimizer state")
        else:
            problems += _check_optimizer(optimizer, saved_optim, shapes)
    if problems:
        raise CheckpointError(f"cannot load {path}:\n  " + "\n  ".join(problems))
    saved_rng = _json(path, header, _RNG_KEY) if rng else None
    metadata = {k: _json(path, header, k) for k in header if not k.startswith("gpunet.")}
    try:
        tensors = safetensors.numpy.load_file(str(path))
    except Exception as e:  # safetensors' own error type; anything it refuses is unreadable
        raise CheckpointError(f"{path}: unreadable safetensors data ({e})") from e
    _attach_rank_devices(path, metadata, tensors)
    if model is not None:
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(saved_optim, tensors))
    if saved_rng is not None:
        devices = {
            k[len(_RNG_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_RNG_PREFIX)
        }
        random.default_generator.set_state({**saved_rng, "devices": devices})
    return metadata


def _attach_rank_devices(path: Path, metadata: dict[str, Any], tensors: dict) -> None:
    """Each rank's device streams (``rng_ranks.<r>.<device>`` tensors) into its entry of the
    metadata's ``rng_ranks``, or a CheckpointError where a tensor names no saved rank."""
    ranks = metadata.get("rng_ranks") or []
    for name, array in tensors.items():
        if not name.startswith(_RANKS_PREFIX):
            continue
        r, _, dev = name[len(_RANKS_PREFIX) :].partition(".")
        if not (r.isdigit() and int(r) < len(ranks) and dev):
            raise CheckpointError(
                f"{path}: tensor {name!r} holds a device stream of no saved rank (the header's "
                f"rng_ranks has {len(ranks)}): a corrupt checkpoint"
            )
        ranks[int(r)].setdefault("devices", {})[dev] = array


# ---------------------------------------------------------------- ranks' generators
def rank_rng_state(saved: list[dict[str, Any]], rank: int, size: int) -> dict[str, Any]:
    """The generator state rank ``rank`` of ``size`` resumes from, given every saved rank's
    state (``saved[r]``, host streams): its own where the world size is the one saved; under
    another size a new stream, seeded by SeedSequence(entropy = every saved seed and PCG64
    word, spawn_key = (size, rank)): distinct across ranks, the same on every run."""
    if not 0 <= rank < size:
        raise ValueError(f"rank_rng_state: need 0 <= rank < size, got rank {rank}, size {size}")
    if not saved:
        raise ValueError("rank_rng_state: no saved generator state to resume from")
    if len(saved) == size:
        return saved[rank]
    entropy = []
    for state in saved:  # (SeedSequence takes non-negative integers of any size)
        host = state["host"]
        entropy += [int(state["seed"]) % 2**128, host["state"]["state"], host["state"]["inc"]]
        entropy += [int(host.get("has_uint32", 0)), int(host.get("uinteger", 0))]
    words = np.random.SeedSequence(entropy, spawn_key=(size, rank)).generate_state(4, np.uint32)
    seed = int.from_bytes(words.astype("<u4").tobytes(), "little")
    return {"seed": seed, "host": np.random.PCG64(seed).state}


# ---------------------------------------------------------------- reading
_HEADER_LIMIT = 100 << 20  # safetensors' own limit on the JSON header (100 MB)


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, tuple]]:
    """The metadata and tensor shapes of a safetensors file: 8 bytes of little-endian header
    length, a JSON header, then the tensors' bytes. Anything else is a CheckpointError that
    says what is wrong, so a user never sees safetensors' own error or a traceback."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if size == 0:
                raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path} is {size} bytes, too short for a safetensors header (8 bytes of "
                    "length, then JSON): truncated, or not a checkpoint"
                )
            length = int.from_bytes(prefix, "little")
            start = f.read(1)
            if start != b"{" or length > _HEADER_LIMIT:
                raise CheckpointError(
                    f"{path} is not a safetensors file (it starts {(prefix + start)[:9]!r}; a "
                    "checkpoint starts with its header's length and a JSON header)"
                )
            if 8 + length > size:
                raise CheckpointError(
                    f"{path} is truncated: its header needs {8 + length} bytes, the file has "
                    f"{size} (an interrupted copy or download?)"
                )
            text = start + f.read(length - 1)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"the header is a JSON {type(raw).__name__}, not an object")
        header = raw.pop("__metadata__", None) or {}
        shapes, end = {}, 0
        for name, info in raw.items():
            shapes[name] = tuple(int(n) for n in info["shape"])
            end = max(end, int(info["data_offsets"][1]))
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise CheckpointError(f"{path} has a corrupt header ({type(e).__name__}: {e})") from None
    if 8 + length + end > size:
        raise CheckpointError(
            f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has "
            f"{size} (an interrupted copy or download?)"
        )
    return header, shapes


def _json(path: Path, header: dict[str, str], key: str) -> Any:
    """The header value ``key`` decoded (None when absent)."""
    if key not in header:
        return None
    try:
        return json.loads(header[key])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the header's {key!r} is not JSON ({e})") from None


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
def _plain(value: Any) -> Any:
    """A hyperparameter as JSON holds it: a one-value tensor (a capturable optimizer's Tensor
    lr, as in PyTorch) as its float; ``Optimizer.load_state_dict`` writes it back into the
    group's tensor."""
    if isinstance(value, Tensor) and value.data.size == 1:
        return float(value.item())
    return value


def _host(value: Any) -> np.ndarray:
    """A tensor or array as a C-contiguous NumPy array (copied from a GPU)."""
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        value = value.numpy()
    elif hasattr(value, "get"):  # CuPy
        value = value.get()
    return np.ascontiguousarray(value)


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync it, then rename it over ``path``: a
    reader sees the old file or the new one, never half of one; a failure leaves no temp."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # (name the file asked for, not the temporary's made-up name)
        what = "no such folder" if isinstance(e, FileNotFoundError) else e.strerror
        raise type(e)(e.errno, f"cannot write {path}: {what} ({directory})") from None
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
