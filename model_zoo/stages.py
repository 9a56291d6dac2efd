"""Two-stage training: a frozen stage-1 network loaded strictly from its checkpoint.

A stage-2 model (f-AnoGAN's encoder, the LTM transformer) keeps its stage-1 networks as ordinary submodules, so
its own checkpoints embed the frozen weights and load strictly for evaluation. :func:`load_frozen_stage` fills
them from the stage-1 training checkpoint, turns gradients off (so no optimizer can hold them: the trainer
refuses frozen parameters in an optimizer group) and returns the provenance (path and SHA-256) that the model
exposes through ``provenance()``. The host model overrides ``train()`` with :func:`keep_frozen_in_eval` so the
frozen networks stay in eval mode (BatchNorm statistics, dropout, VQ EMA codebook updates all off) even when the
trainer calls ``model.train()``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from dl_utils import checkpoint as ckpt
from dl_utils.run import file_sha256

logger = logging.getLogger(__name__)


def load_frozen_stage(modules: Mapping[str, nn.Module], path: str | Path, *, stage_name: str) -> dict[str, Any]:
    """Load stage-1 weights into ``modules`` strictly and freeze them.

    The checkpoint's weights (EMA weights when it has them, as evaluation does) must consist of exactly the
    prefixes ``<name>.`` of ``modules`` (any other key is an error), each loaded strictly.

    Args:
        modules: ``{prefix: submodule}``, e.g. ``{'generator': G, 'critic': D}`` for keys ``generator.*``.
        path: the stage-1 checkpoint (``latest.pt`` / ``best.pt`` of the stage-1 run).
        stage_name: what stage 1 is, for messages (``'WGAN-GP'``).

    Returns:
        ``{'path', 'sha256', 'weights'}`` (``weights``: ``'ema'`` or ``'model'``).

    Raises:
        dl_utils.checkpoint.CheckpointError: missing/corrupt file, or keys that do not fit (listed).
    """
    path = Path(path)
    state = ckpt.load_checkpoint(path)
    which = "ema" if state.get("ema") is not None else "model"
    weights = state.get(which)
    if not isinstance(weights, Mapping):
        raise ckpt.CheckpointError(f"{stage_name} checkpoint {path} has no '{which}' weights "
                                   f"(keys: {', '.join(sorted(state))})")
    prefixes = tuple(f"{name}." for name in modules)
    stray = sorted(k for k in weights if not k.startswith(prefixes))
    if stray:
        raise ckpt.CheckpointError(f"{stage_name} checkpoint {path} does not fit: unexpected keys {stray[:10]} "
                                   f"(expected only {', '.join(p + '*' for p in prefixes)})")
    for name, module in modules.items():
        sub = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(f"{name}.")}
        ckpt.load_state_strict(module, sub, f"'{which}' weights '{name}.*' of {stage_name} checkpoint {path}")
        freeze(module)
    provenance = {"path": str(path.resolve()), "sha256": file_sha256(path), "weights": which}
    logger.info("frozen %s stage loaded from %s (sha256 %s, %s weights)", stage_name, path,
                provenance["sha256"][:12], which)
    return provenance


def freeze(module: nn.Module) -> None:
    """Eval mode and ``requires_grad=False`` for every parameter of ``module``."""
    module.eval()
    module.requires_grad_(False)


def keep_frozen_in_eval(*modules: nn.Module) -> None:
    """Put the frozen ``modules`` back into eval mode (call at the end of the host's ``train()`` override)."""
    for module in modules:
        module.eval()
