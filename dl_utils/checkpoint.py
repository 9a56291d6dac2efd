"""Checkpoint files: atomic writes, safe reads, strict weight loading and RNG states as plain data.

A training checkpoint (``latest.pt`` / ``best.pt``) is a dict::

    {'model', 'ema', 'optimizers', 'schedulers', 'scalers', 'epoch', 'step', 'best_metric', 'rng', 'config',
     'trainer'}

``model``/``ema`` are full ``state_dict``s (``ema`` is None without EMA), ``optimizers``/``schedulers``/``scalers``
map each optimizer group to its state (None where a group has no scheduler or no fp16 scaler; a model without
groups of its own has the one group ``model``). Checkpoints written before the trainer had one optimisation path
hold a single optimizer as ``optimizer``/``scheduler``/``scaler`` instead: :func:`grouped_optimizer_state` reads
both formats. ``rng`` is a list with one
:func:`capture_rng_state` dict per rank, ``trainer`` holds the loop's bookkeeping (batches consumed in the
current epoch, validations without improvement, world size). Everything in it is tensors and plain Python
values, so it loads with ``torch.load(weights_only=True)``. A file written by the checkpoint importer holds
only ``{'model', 'config'}``; :func:`load_model_weights` accepts it.
"""

from __future__ import annotations

import logging
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dl_utils.errors import UserError
from dl_utils.files import write_atomic

logger = logging.getLogger(__name__)

_MAX_LISTED_KEYS = 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message names the file."""

    kind = "checkpoint"


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    A crash while writing leaves the previous file intact. The folder is created if needed.

    Args:
        path: destination, e.g. ``<run>/checkpoints/latest.pt``.
        state: tensors and plain Python values only (it must load with ``weights_only=True``).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(path, lambda tmp: _torch_save(state, tmp), fsync=True)
    except OSError as err:
        if err.filename is None:  # torch's writer does not name the file (e.g. ENOSPC on a full disk)
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    return path


def _torch_save(state: Mapping[str, Any], path: Path) -> None:
    with open(path, "wb") as handle:  # a Python file: a full disk raises OSError (torch's own writer: RuntimeError)
        torch.save(dict(state), handle)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: naming the file when it is missing, truncated, corrupt or not a dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, KeyError, IndexError,
            TypeError) as err:  # what torch.load raises for a truncated zip, a text file or a foreign pickle
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise CheckpointError(f"cannot read checkpoint {path} (not a torch checkpoint, truncated or corrupt): "
                              f"{reason}") from err
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror or err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


TRAINING_KEYS = ("model", "optimizers", "epoch", "step", "rng", "trainer")
DEFAULT_GROUP = "model"  # the one optimizer group of a model that declares none


def missing_training_keys(state: Mapping[str, Any]) -> list[str]:
    """The keys a resumable training checkpoint lacks ([] when it has all); the single-optimizer format's
    ``optimizer`` counts for ``optimizers``."""
    return [key for key in TRAINING_KEYS if key not in state and not (key == "optimizers" and "optimizer" in state)]


def grouped_optimizer_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``{'optimizers', 'schedulers', 'scalers'}`` keyed by group, from a checkpoint of either format.

    A single-optimizer checkpoint (``optimizer``/``scheduler``/``scaler``, with ``optimizers`` absent or None) maps
    to the one group :data:`DEFAULT_GROUP`, which is what the trainer builds for a model without groups.
    """
    if state.get("optimizers") is not None:
        return {key: state.get(key) for key in ("optimizers", "schedulers", "scalers")}
    return {"optimizers": {DEFAULT_GROUP: state.get("optimizer")},
            "schedulers": {DEFAULT_GROUP: state.get("scheduler")},
            "scalers": {DEFAULT_GROUP: state.get("scaler")}}


def _listed(keys: set[str]) -> str:
    names = sorted(keys)
    more = f" ... (+{len(names) - _MAX_LISTED_KEYS} more)" if len(names) > _MAX_LISTED_KEYS else ""
    return ", ".join(names[:_MAX_LISTED_KEYS]) + more


def check_state_dict_keys(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Raise :class:`CheckpointError` listing every missing and unexpected key of ``state`` for ``model``."""
    expected = set(model.state_dict().keys())
    given = set(state.keys())
    missing, extra = expected - given, given - expected
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if extra:
            parts.append(f"unexpected keys ({len(extra)}): {_listed(extra)}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))


def load_state_strict(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with errors that name ``source`` and the keys at fault."""
    check_state_dict_keys(model, state, source)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: {err}") from err


def load_model_weights(model: nn.Module, path: str | Path, *, prefer_ema: bool = True) -> str:
    """Load a checkpoint's weights into ``model`` strictly (no missing and no extra key).

    Args:
        model: the model to fill (in place).
        path: a training checkpoint or an importer file holding only ``{'model', 'config'}``.
        prefer_ema: load the EMA weights when the file has them (``'ema'`` not None).

    Returns:
        A description of what was loaded, e.g. ``"EMA weights from runs/.../best.pt (epoch 12, step 3400)"``.

    Raises:
        CheckpointError: naming the file for a missing/corrupt file, a file without weights, or a key or
            shape mismatch (listing the missing and unexpected keys).
    """
    path = Path(path)
    state = load_checkpoint(path)
    use_ema = prefer_ema and state.get("ema") is not None
    key = "ema" if use_ema else "model"
    weights = state.get(key)
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"checkpoint {path} has no '{key}' weights (keys: {', '.join(sorted(state))})")
    load_state_strict(model, weights, f"'{key}' weights of {path}")
    where = []
    if state.get("epoch") is not None:
        where.append(f"epoch {state['epoch']}")
    if state.get("step") is not None:
        where.append(f"step {state['step']}")
    kind = "EMA weights" if use_ema else "model weights"
    description = f"{kind} from {path}" + (f" ({', '.join(where)})" if where else "")
    logger.info("loaded %s", description)
    return description


def clone_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module.state_dict()`` (never aliased to the live weights)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ RNG
def capture_rng_state() -> dict[str, Any]:
    """The process's RNG states (torch CPU, CUDA if available, numpy, python) as tensors and plain values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only when CUDA is available."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            logger.warning("checkpoint holds %d CUDA RNG states for %d visible devices; restoring the first ones",
                           len(cuda_states), torch.cuda.device_count())
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["state"].tolist()),
                     python_state["gauss_next"]))
