"""Per-image numbers of an evaluation, written beside its metrics so that a study can resample images (bootstrap
intervals, paired comparisons) without running the model again.

A task returns, per dataset, a :class:`PerImage` (``TaskResult.per_image``): the images' paths and labels, columns
with one row per image and the dataset's constants (e.g. a histogram binning). :func:`write_per_image` merges the
blocks of each dataset (their paths must agree) into ``<run folder>/per_image/<dataset>.npz`` (keys ``path``,
``subject``, ``label``, ``<block>/<column>``, ``<block>/<constant>``, and ``constants``: the names of the constant
keys) and ``<dataset>.csv`` (path, subject, label and every one-dimensional column, for reading);
:func:`read_per_image` reads the ``.npz`` files back (no pickles).

What the shipped tasks write (block names as in ``_base/evaluation.yaml``):

- ``detection/score`` [N]: the image anomaly score, on the healthy set and every pathological set (constant
  ``detection/healthy`` on the latter: the healthy set it was compared with);
- ``segmentation/hist_anomaly``, ``segmentation/hist_healthy`` [N, K] int32: the anomaly map's histogram on the
  anomaly and on the healthy pixels of the evaluation region (:func:`optim.metrics.resampled.pixel_histograms`,
  K = 1024 quantile bins of the dataset's region values), ``segmentation/dice`` [N] at the task's threshold;
  constants ``hist_edges`` [K-1] and ``hist_bound`` (the largest error of the pooled pixel AUROC recomputed from the
  histograms);
- ``rqi/ssim``, ``rqi/lpips``, ``rqi/mae``, ``rqi/rqi`` [N] on the healthy test set (RQI is the mean of ``rqi``);
- ``caci/conservation``, ``caci/correction``, ``caci/caci`` [N] on annotated sets (NaN for an image without a
  lesion; CACI is the mean of the finite ``caci`` values);
- ``ahi/input_features`` [N, d] float32 (Inception features of the reference set's rows used, the healthy set and
  each pathological set), ``ahi/restored_features`` [N, d] (of the restorations of each pathological set); on the
  reference set the constants ``healthy``, ``pathological`` (the sets pooled into ``all_pathological``, in order),
  ``draws`` and ``seed`` of the equal-n FIDs. About 8 KB per image and set at d = 2048 (``save_features: false``
  on the ``ahi`` block leaves them out).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONSTANTS_KEY = "constants"


@dataclass(frozen=True, kw_only=True)
class PerImage:
    """One dataset's per-image numbers.

    Attributes:
        path: the N images' source paths, in evaluation order.
        label: [N] int image labels (1 = pathological).
        columns: name -> array with N rows (any trailing shape).
        constants: name -> array of the dataset, not per image (e.g. bin edges).
        subject: the N images' subject ids (slices of one volume share one); empty: each image its own (``path``).
    """

    path: tuple[str, ...]
    label: np.ndarray
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    subject: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.path)
        if not self.subject:
            object.__setattr__(self, "subject", self.path)
        elif len(self.subject) != n:
            raise ValueError(f"PerImage: {len(self.subject)} subjects for {n} paths")
        if np.shape(self.label) != (n,):
            raise ValueError(f"PerImage: label has shape {np.shape(self.label)}, expected ({n},)")
        for name, value in self.columns.items():
            if np.ndim(value) == 0 or np.shape(value)[0] != n:
                raise ValueError(f"PerImage: column {name!r} has shape {np.shape(value)}, expected {n} rows")

    @classmethod
    def of(cls, path: Sequence[str], label: Any, columns: Mapping[str, Any] | None = None,
           constants: Mapping[str, Any] | None = None, *, subject: Sequence[str] = ()) -> PerImage:
        """Build from sequences / tensors (converted to numpy)."""
        return cls(path=tuple(str(p) for p in path), label=_array(label).astype(np.int64).reshape(-1),
                   columns={k: _array(v) for k, v in (columns or {}).items()},
                   constants={k: _array(v) for k, v in (constants or {}).items()},
                   subject=tuple(str(s) for s in subject))

    @classmethod
    def of_images(cls, images: Any, columns: Mapping[str, Any] | None = None,
                  constants: Mapping[str, Any] | None = None, *, limit: int | None = None) -> PerImage:
        """From anything with ``path``, ``label`` and ``subject`` (an evaluation's ``Inference``), its first
        ``limit`` images (all when None)."""
        rows = slice(None, limit)
        return cls.of(images.path[rows], images.label[rows], columns, constants, subject=images.subject[rows])


def _array(value: Any) -> np.ndarray:
    return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)


def merge(blocks: Mapping[str, Mapping[str, PerImage]]) -> dict[str, PerImage]:
    """``{block: {dataset: PerImage}}`` -> ``{dataset: PerImage}`` with keys prefixed ``<block>/``.

    Raises:
        ValueError: two blocks saw a dataset's images in different order or with different labels.
    """
    merged: dict[str, PerImage] = {}
    first: dict[str, str] = {}
    for block, datasets in blocks.items():
        for dataset, table in datasets.items():
            columns = {f"{block}/{k}": v for k, v in table.columns.items()}
            constants = {f"{block}/{k}": v for k, v in table.constants.items()}
            if dataset not in merged:
                merged[dataset], first[dataset] = PerImage(path=table.path, label=table.label, columns=columns,
                                                           constants=constants, subject=table.subject), block
                continue
            seen = merged[dataset]
            if seen.path != table.path or seen.subject != table.subject or not np.array_equal(seen.label,
                                                                                              table.label):
                raise ValueError(f"per-image tables of {dataset!r}: blocks {first[dataset]!r} and {block!r} list "
                                 "different images, subjects or labels")
            merged[dataset] = PerImage(path=seen.path, label=seen.label, columns={**seen.columns, **columns},
                                       constants={**seen.constants, **constants}, subject=seen.subject)
    return merged


def write_per_image(folder: str | Path, blocks: Mapping[str, Mapping[str, PerImage]]) -> list[Path]:
    """Write ``<folder>/<dataset>.npz`` and ``<dataset>.csv`` for every dataset of ``blocks`` (see the module doc).

    Returns:
        The written ``.npz`` paths (none, and no folder, when no block returned per-image numbers).
    """
    merged = merge(blocks)
    if not merged:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for dataset, table in merged.items():
        path = folder / f"{dataset}.npz"
        np.savez_compressed(path, path=np.asarray(table.path, dtype=str), label=table.label,
                            subject=np.asarray(table.subject, dtype=str), **table.columns,
                            **table.constants, **{CONSTANTS_KEY: np.asarray(sorted(table.constants), dtype=str)})
        flat = [k for k, v in table.columns.items() if v.ndim == 1]
        with (folder / f"{dataset}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "subject", "label", *flat])
            for i, image in enumerate(table.path):
                writer.writerow([image, table.subject[i], int(table.label[i]),
                                 *(table.columns[k][i].item() for k in flat)])
        paths.append(path)
    return paths


def read_per_image(folder: str | Path) -> dict[str, PerImage]:
    """Every ``<folder>/<dataset>.npz`` written by :func:`write_per_image`, by dataset name (empty if none)."""
    tables: dict[str, PerImage] = {}
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            constant_keys = set(data[CONSTANTS_KEY].tolist()) if CONSTANTS_KEY in data else set()
            rest = [k for k in data.files if k not in ("path", "label", "subject", CONSTANTS_KEY)]
            tables[path.stem] = PerImage(path=tuple(data["path"].tolist()), label=data["label"],
                                         columns={k: data[k] for k in rest if k not in constant_keys},
                                         constants={k: data[k] for k in rest if k in constant_keys},
                                         subject=tuple(data["subject"].tolist()) if "subject" in data else ())
    return tables
