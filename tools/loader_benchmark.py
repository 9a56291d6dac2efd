"""Loader throughput: images/s of the first (decoding) epoch and of a cached epoch.

``loader_throughput`` writes ``n`` synthetic grey images (smooth random blobs, non-square so padding and
resizing run) to a temporary folder with a split CSV, builds a :class:`core.data_module.DataModule` on it and
times two passes of the training loader: the first pass decodes and preprocesses every file (filling the
cache), the second reads the cache. CLI: ``python -m tools.loader_benchmark [--n 10000] [--size 128]`` prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

FileFormat = Literal["png", "npy"]


def _write_files(folder: Path, n: int, shape: tuple[int, int], fmt: FileFormat, seed: int) -> Path:
    from PIL import Image
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    # A few smooth base images, varied per file by a cheap random shift + noise (writing stays fast).
    bases = [ndi.gaussian_filter(rng.random(shape), 6.0) for _ in range(8)]
    lines = ["filename"]
    for i in range(n):
        base = bases[i % len(bases)]
        image = np.roll(base, int(rng.integers(0, 16)), axis=1) + rng.normal(0, 0.01, shape)
        image = (image - image.min()) / (image.max() - image.min())
        path = folder / f"img_{i:06d}.{fmt}"
        if fmt == "png":
            Image.fromarray((image * 255).astype(np.uint8)).save(path)
        else:
            np.save(path, image.astype(np.float32))
        lines.append(str(path))
    csv_path = folder / "split.csv"
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path


def loader_throughput(n: int = 10000, size: int = 128, *, fmt: FileFormat = "png",
                      native_shape: Sequence[int] = (200, 160), batch_size: int = 64, num_workers: int = 0,
                      cache: Literal["memory", "disk"] = "memory", seed: int = 0) -> dict[str, float | int | str]:
    """Measure the training loader's throughput on ``n`` synthetic files.

    Args:
        n: number of files.
        size: target side (images are resized to ``size`` x ``size``).
        fmt: file format written (``'png'`` 8-bit or ``'npy'`` float32).
        native_shape: (H, W) of the written files (non-square: padding and resizing are exercised).
        batch_size: training batch size.
        num_workers: loader workers (also used to decode while the cache is filled).
        cache: ``'memory'`` or ``'disk'``.
        seed: seed of the synthetic images and of the shuffling.

    Returns:
        ``first_epoch_images_per_s`` (decode + preprocess + cache fill + batching),
        ``cached_epoch_images_per_s``, the seconds of each pass, the seconds spent writing the files, and
        the settings.
    """
    from core.data_module import DataModule

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    shape = (int(native_shape[0]), int(native_shape[1]))
    with tempfile.TemporaryDirectory(prefix="loader_throughput_") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        csv_path = _write_files(folder, n, shape, fmt, seed)
        write_s = time.perf_counter() - start
        data = DataModule(target_size=(size, size), batch_size=batch_size, num_workers=num_workers,
                          train={"images": [str(csv_path)]}, intensity="minmax", cache=cache,
                          cache_dir=str(folder / "cache"))
        timings = []
        for epoch in range(2):
            start = time.perf_counter()
            seen = 0
            for batch in data.train_dataloader(seed=seed + epoch):
                seen += len(batch)
            timings.append(time.perf_counter() - start)
            if seen != n:
                raise RuntimeError(f"epoch {epoch} yielded {seen} images, expected {n}")
    return {"n": n, "size": size, "format": fmt, "native_shape": f"{shape[0]}x{shape[1]}", "batch_size": batch_size,
            "num_workers": num_workers, "cache": cache, "write_s": round(write_s, 3),
            "first_epoch_s": round(timings[0], 6), "cached_epoch_s": round(timings[1], 6),
            "first_epoch_images_per_s": round(n / timings[0], 1), "cached_epoch_images_per_s": round(n / timings[1], 1)}


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the throughput as JSON."""
    parser = argparse.ArgumentParser(description="Measure data-loader throughput on synthetic files.")
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--format", choices=("png", "npy"), default="png")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--cache", choices=("memory", "disk"), default="memory")
    args = parser.parse_args(argv)
    result = loader_throughput(args.n, args.size, fmt=args.format, batch_size=args.batch_size,
                               num_workers=args.num_workers, cache=args.cache)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
