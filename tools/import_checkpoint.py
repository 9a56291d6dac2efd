"""Import a predecessor DDPM/AnoDDPM/AutoDDPM checkpoint (MONAI-generative UNet) into this project's format.

Usage::

    python -m tools.import_checkpoint --src OLD.pt --out NEW.pt --config projects/normative_eval/configs/ddpm.yaml

The predecessor saved ``{'model_weights': state_dict, 'optimizer_weights': ..., 'epoch': ...}``; its model held
the UNet under ``unet.`` and, for some methods, LPIPS networks (dropped here). MONAI-generative's
``DiffusionModelUNet`` was merged into MONAI with renamed attention and up-sampling layers:

================================================  ==================================================
old (MONAI-generative)                            new (MONAI >= 1.4)
================================================  ==================================================
``...attentions.N.to_q|to_k|to_v.*``              ``...attentions.N.attn.to_q|to_k|to_v.*``
``middle_block.attention.to_q|to_k|to_v.*``       ``middle_block.attention.attn.to_q|to_k|to_v.*``
``...attentions.N.proj_attn.*`` (never applied)   ignored; ``...attn.out_proj`` set to identity
``up_blocks.N.upsampler.conv.*``                  ``up_blocks.N.upsampler.postconv.*``
================================================  ==================================================

The old attention block defined ``proj_attn`` but never applied it, so the equivalent new block has an identity
output projection (weight I, bias 0). The converted weights are loaded strictly into the model the config's
``model`` block builds, and ``{'model': state_dict, 'config': resolved config, 'source': {...}}`` is written
atomically (``dl_utils.checkpoint.load_model_weights`` reads it). Files are read with ``weights_only=True`` only.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.Configurator import ConfigError, allow_imports, build, load_config
from dl_utils.checkpoint import CheckpointError, load_state_strict, save_checkpoint
from model_zoo.base import TrainableModel

logger = logging.getLogger(__name__)

UNET_PREFIX = "unet."
_QKV = re.compile(r"^(.*(?:\.attentions\.\d+|\.middle_block\.attention))\.(to_q|to_k|to_v)\.(weight|bias)$")
_PROJ_ATTN = re.compile(r"^(.*(?:\.attentions\.\d+|\.middle_block\.attention))\.proj_attn\.(weight|bias)$")
_UPSAMPLER = re.compile(r"^(.*\.up_blocks\.\d+\.upsampler)\.conv\.(.*)$")


class CheckpointImportError(CheckpointError):
    """An old checkpoint cannot be imported; the message names the file and what to do."""


def read_legacy_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read the predecessor's checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointImportError: the file is missing, is not a dict with ``model_weights``, or holds pickled
            Python objects that ``weights_only=True`` refuses (with instructions to re-save its tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"--src {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointImportError(
            f"--src {path}: torch.load(weights_only=True) refused it because it stores pickled Python objects "
            f"besides tensors ({err}). This importer never unpickles arbitrary objects. If you trust the file, "
            "re-save its tensors in a trusted Python session: "
            f"`c = torch.load('{path}', weights_only=False); "
            "torch.save({'model_weights': c['model_weights'], 'epoch': int(c.get('epoch', -1))}, 'tensors_only.pt')` "
            "and import tensors_only.pt"
        ) from err
    if not isinstance(state, dict) or not isinstance(state.get("model_weights"), Mapping):
        keys = ", ".join(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointImportError(f"--src {path}: expected a dict with 'model_weights' (the predecessor's "
                                    f"format), found {keys}")
    return state


def convert_state_dict(old: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Rename a predecessor model state dict to this project's DDPM keys (``unet.`` + MONAI names).

    Args:
        old: the predecessor's ``model_weights`` (a leading ``module.`` from DDP is stripped).

    Returns:
        (new state dict, report): the report lists renamed keys, dropped key prefixes with counts, ignored
        ``proj_attn`` keys and the attention blocks whose ``out_proj`` was set to identity.
    """
    items = dict(old)
    if items and all(k.startswith("module.") for k in items):
        items = {k[len("module."):]: v for k, v in items.items()}
    new: dict[str, Tensor] = {}
    dropped: Counter[str] = Counter()
    renamed, ignored_proj = 0, []
    blocks: dict[str, Tensor] = {}  # attention block -> one of its q/k/v weights (for out_proj's shape/dtype)
    for key, value in items.items():
        if not key.startswith(UNET_PREFIX):
            dropped[key.split(".", 1)[0]] += 1
            continue
        if _PROJ_ATTN.match(key):
            ignored_proj.append(key)
            continue
        m = _QKV.match(key)
        if m:
            new_key = f"{m.group(1)}.attn.{m.group(2)}.{m.group(3)}"
            if m.group(3) == "weight":
                blocks[m.group(1)] = value
        else:
            m = _UPSAMPLER.match(key)
            new_key = f"{m.group(1)}.postconv.{m.group(2)}" if m else key
        renamed += new_key != key
        new[new_key] = value
    for block, qkv in sorted(blocks.items()):
        dim = qkv.shape[0]
        new[f"{block}.attn.out_proj.weight"] = torch.eye(dim, dtype=qkv.dtype)
        new[f"{block}.attn.out_proj.bias"] = torch.zeros(dim, dtype=qkv.dtype)
    report = {"renamed": renamed, "dropped_prefixes": dict(dropped), "ignored_proj_attn": len(ignored_proj),
              "identity_out_proj": sorted(blocks)}
    return new, report


def import_checkpoint(src: str | Path, out: str | Path, config_path: str | Path,
                      overrides: Sequence[str] = ()) -> Path:
    """Convert ``src`` for the model of ``config_path``, load it strictly, write ``out``.

    Returns:
        The path written.

    Raises:
        CheckpointImportError: unreadable source, or weights that do not fit the config's model (the message
            names the config and lists the missing/unexpected keys).
        ConfigError: the config or its ``model`` block is invalid.
    """
    src, out = Path(src), Path(out)
    config = load_config(config_path, overrides)
    allow_imports(config.get("allow_imports"))
    if "model" not in config:
        raise ConfigError(f"{config_path}: no 'model' block")
    model = build(config["model"], "model", base=TrainableModel)
    legacy = read_legacy_checkpoint(src)
    weights, report = convert_state_dict(legacy["model_weights"])
    try:
        load_state_strict(model, weights, f"converted weights of {src} (model from {config_path})")
    except CheckpointError as err:
        raise CheckpointImportError(f"{err}. Check that the UNet parameters of {config_path} "
                                    "'model.params.network' (channels, attention_levels, num_res_blocks, "
                                    "num_head_channels, norm_num_groups) match the old model") from err
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    epoch = legacy.get("epoch")
    source = {"path": str(src), "sha256": digest, "epoch": epoch if isinstance(epoch, int | float) else None,
              "format": "predecessor MONAI-generative DDPM ({'model_weights', 'optimizer_weights', 'epoch'})",
              **report}
    logger.info("imported %s: %d tensors, %d renamed, dropped %s, identity out_proj in %d attention blocks",
                src, len(weights), report["renamed"], report["dropped_prefixes"] or "nothing",
                len(report["identity_out_proj"]))
    return save_checkpoint(out, {"model": model.state_dict(), "config": config, "source": source})


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m tools.import_checkpoint", description=__doc__.split("\n")[0])
    parser.add_argument("--src", required=True, help="the predecessor's checkpoint (.pt)")
    parser.add_argument("--out", required=True, help="where to write the converted checkpoint")
    parser.add_argument("--config", required=True, help="experiment YAML whose 'model' block receives the weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="config override (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = import_checkpoint(args.src, args.out, args.config, args.overrides)
    except (CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
