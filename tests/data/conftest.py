"""Tiny on-disk splits shared by the data tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_csv(path: Path, files: list[Path | str]) -> Path:
    path.write_text("filename\n" + "".join(f"{f}\n" for f in files), encoding="utf-8")
    return path


@pytest.fixture
def make_split(tmp_path: Path) -> Callable[..., dict[str, Path]]:
    """``make_split(name, n, shape)`` writes n NPY images + PNG anomaly masks + NPY brain masks and their CSVs.

    Image i is a ramp plus i (so every image is distinct); its anomaly mask marks the top-left quarter.
    """

    def make(name: str = "s", n: int = 5, shape: tuple[int, int] = (24, 20)) -> dict[str, Path]:
        folder = tmp_path / name
        folder.mkdir()
        images, labels, masks = [], [], []
        for i in range(n):
            image = np.add.outer(np.arange(shape[0]), np.arange(shape[1])).astype(np.float32) * (1 + i)
            np.save(folder / f"img{i}.npy", image)
            label = np.zeros(shape, np.uint8)
            label[: shape[0] // 2, : shape[1] // 2] = 255
            Image.fromarray(label).save(folder / f"lab{i}.png")
            np.save(folder / f"brain{i}.npy", np.ones(shape, np.uint8))
            images.append(folder / f"img{i}.npy")
            labels.append(folder / f"lab{i}.png")
            masks.append(folder / f"brain{i}.npy")
        return {"images": write_csv(folder / "images.csv", images), "labels": write_csv(folder / "labels.csv", labels),
                "masks": write_csv(folder / "masks.csv", masks), "folder": folder}

    return make
