"""On-disk cache of feature matrices (e.g. Inception features for FID/KID), keyed by image content.

Features of images that do not depend on the model (the healthy training set N, the unseen healthy set U, the
pathological inputs P) are the same in every run; :func:`cached_features` computes them once and reuses them.

Key: SHA-256 over the images' content (the bytes of the images as a C-contiguous float32 array, with their
shape) and the caller's ``key_parts``, which must name everything else the features depend on: the
extractor's backend name, its weights and its input resolution, e.g.
``{"backend": net.backend_name, "weights": net.provenance["fid_weights"], "resolution": 299}``. Any change of
content, shape or a key part is a miss.

Files: ``<cache_dir>/<key>.npy`` (the features, ``numpy.save`` without pickle) and ``<key>.json`` (the key
parts, the image shape and the feature shape, for people). Both are written to a temporary file in
``cache_dir`` and renamed into place (atomic on POSIX), the features last, so a reader sees a complete entry
or none, and concurrent writers of the same key write the same bytes. Nothing is ever deleted here.

Usage (the caller keeps the extractor; this module does no model I/O)::

    feats = cached_features(images, extractor=net.features, cache_dir=Path("cache/features"),
                            key_parts={"backend": net.backend_name, "weights": net.provenance["fid_weights"],
                                       "resolution": 299})
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dl_utils.files import write_atomic, write_text_atomic

logger = logging.getLogger(__name__)

KeyValue = str | int | float | bool | None


def content_hash(images: Tensor) -> str:
    """SHA-256 hex digest of ``images`` (any shape) as a C-contiguous float32 array, shape included."""
    array = np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())
    digest = hashlib.sha256(json.dumps(list(array.shape)).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def cache_key(images: Tensor, key_parts: Mapping[str, KeyValue]) -> str:
    """The cache key of ``images`` with ``key_parts`` (see the module docstring)."""
    for name, value in key_parts.items():
        if not isinstance(name, str) or not isinstance(value, KeyValue):
            raise TypeError(f"cached_features: key_parts[{name!r}] = {value!r} must be a str/int/float/bool/None")
    text = json.dumps({"content": content_hash(images), "parts": dict(key_parts)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, array, allow_pickle=False)


def cached_features(images: Tensor, *, extractor: Callable[[Tensor], Tensor], key_parts: Mapping[str, KeyValue],
                    cache_dir: str | Path) -> Tensor:
    """Features of ``images``, read from ``cache_dir`` when present, else computed by ``extractor`` and stored.

    Args:
        images: [N, ...] images (e.g. [N,1,H,W] in [0,1]); their float32 bytes and shape form the content key.
        extractor: images -> [N, d] features (e.g. ``InceptionFeatures.features``); called only on a miss.
        key_parts: everything else the features depend on (backend name, weights, resolution); JSON scalars.
        cache_dir: folder of the cache (created on the first write).

    Returns:
        [N, d] features on the CPU, with the dtype the extractor returned; a hit returns exactly the bytes
        stored by the miss that computed them.

    Raises:
        ValueError: the extractor's output (or a cached file) does not have one row per image.
    """
    cache_dir = Path(cache_dir)
    key = cache_key(images, key_parts)
    path = cache_dir / f"{key}.npy"
    if path.is_file():
        features = np.load(path, allow_pickle=False)
        if features.ndim != 2 or features.shape[0] != images.shape[0]:
            raise ValueError(f"cached_features: {path} holds features of shape {features.shape}, expected "
                             f"[{images.shape[0]}, d]; delete the file")
        logger.info("feature cache hit: %s (%d images, %s)", path.name, images.shape[0], dict(key_parts))
        return torch.from_numpy(features)
    computed = extractor(images)
    if computed.ndim != 2 or computed.shape[0] != images.shape[0]:
        raise ValueError(f"cached_features: the extractor returned shape {tuple(computed.shape)} for "
                         f"{images.shape[0]} images; expected [N, d]")
    features = computed.detach().cpu().numpy()
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"key_parts": dict(key_parts), "image_shape": list(images.shape), "feature_shape": list(features.shape),
            "feature_dtype": str(features.dtype)}
    write_text_atomic(cache_dir / f"{key}.json", json.dumps(meta, indent=1, sort_keys=True))
    write_atomic(path, lambda p: _save_npy(p, features))
    logger.info("feature cache miss: stored %s (%d images, %s)", path.name, images.shape[0], dict(key_parts))
    return torch.from_numpy(features.copy())
