"""Split files -> records -> preprocessed, cached slices -> :class:`data.batch.Sample`.

A split is a list of :class:`Record` (image file + optional row-aligned anomaly mask + optional brain /
healthy-tissue mask + the subject it belongs to: the image CSV's optional ``subject`` column, which groups the
slices of one volume; without it each image is its own subject). :class:`SliceStore` decodes and preprocesses
them (:mod:`data.preprocess`) and keeps the result, depending on ``cache``:

- ``'memory'``: on first use every slice is decoded once (in parallel with ``num_workers`` processes) into
  numpy arrays in this process; loader workers forked later share them copy-on-write.
- ``'disk'``: the same arrays are written once to ``<cache_dir>/<split>-<key>/{image,anomaly,brain}.npy`` and
  memory-mapped; ``key`` hashes the cache version, the preprocessing settings, the split CSVs' bytes and every
  referenced file's path, size and modification time, so any change gives a new cache folder. Written to a
  temporary folder and renamed, so an interrupted build is never read.
- ``'none'``: every access decodes the files again.

:class:`SliceDataset` is a view of a store with an optional list of transforms (augmentation). Augmentation
therefore always runs *after* the cache, and a store can be shared by an augmented training view and a
plain evaluation view.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data.batch import Sample
from data.preprocess import Intensity, check_intensity, preprocess_image, preprocess_mask
from data.readers import DataReadError, read_slice
from dl_utils.errors import DataError

logger = logging.getLogger(__name__)

CacheMode = Literal["memory", "disk", "none"]
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
CACHE_VERSION = "slices-v1"
FILENAME_COLUMN = "filename"
SUBJECT_COLUMN = "subject"


class SplitError(DataError, ValueError):
    """A split's files are inconsistent (lengths, shapes, empty, missing column or file)."""


@dataclass(frozen=True)
class Record:
    """One row of a split.

    Attributes:
        image: the image file.
        anomaly_mask: the row-aligned anomaly (lesion / box) mask file, or None.
        brain_mask: the row-aligned brain or healthy-tissue mask file, or None.
        source: where the row came from, for error messages (``<csv> row <n>`` or ``glob <pattern>``).
        subject: the image CSV's ``subject`` value (slices of one volume share it), or None without that column.
    """

    image: Path
    anomaly_mask: Path | None
    brain_mask: Path | None
    source: str
    subject: str | None = None


def resolve(path: str | Path, root: Path) -> Path:
    """``path`` if absolute, else ``root / path``."""
    path = Path(path)
    return path if path.is_absolute() else root / path


def read_split_csv(csv_path: Path, root: Path) -> list[tuple[Path, str]]:
    """Read a split CSV (header row with a ``filename`` column; :func:`read_subjects` reads the optional
    ``subject`` column; other columns are ignored).

    Args:
        csv_path: the CSV file.
        root: folder that relative file names are resolved against.

    Returns:
        (resolved file, ``"<csv> row <n>"``) per data row, in file order; ``n`` counts data rows from 1.

    Raises:
        SplitError: the CSV is missing or has no ``filename`` column, or a row's filename is empty.
    """
    if not csv_path.is_file():
        raise SplitError(f"split CSV not found: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or FILENAME_COLUMN not in reader.fieldnames:
            raise SplitError(f"{csv_path}: needs a header row with a {FILENAME_COLUMN!r} column, "
                             f"got {reader.fieldnames}")
        rows = []
        for n, row in enumerate(reader, start=1):
            name = (row.get(FILENAME_COLUMN) or "").strip()
            if not name:
                raise SplitError(f"{csv_path} row {n}: empty {FILENAME_COLUMN!r}")
            rows.append((resolve(name, root), f"{csv_path} row {n}"))
    return rows


def read_subjects(csv_path: Path) -> list[str | None]:
    """The ``subject`` column of a split CSV, one entry per data row; all None when the CSV has no such column.

    Raises:
        SplitError: the CSV is missing, or it has the column and a row leaves it empty.
    """
    if not csv_path.is_file():
        raise SplitError(f"split CSV not found: {csv_path}")
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        has_column = SUBJECT_COLUMN in (reader.fieldnames or [])
        subjects: list[str | None] = []
        for n, row in enumerate(reader, start=1):
            if not has_column:
                subjects.append(None)
                continue
            value = (row.get(SUBJECT_COLUMN) or "").strip()
            if not value:
                raise SplitError(f"{csv_path} row {n}: empty {SUBJECT_COLUMN!r} (the column is optional, but a "
                                 "row of a CSV that has it needs a value)")
            subjects.append(value)
    return subjects


def build_records(*, images: Sequence[tuple[Path, str]], labels: Sequence[tuple[Path, str]] | None,
                  masks: Sequence[tuple[Path, str]] | None, name: str,
                  subjects: Sequence[str | None] | None = None) -> list[Record]:
    """Zip row-aligned image / label / mask lists (and the images' subject ids) into records, checking lengths
    and that files exist.

    Raises:
        SplitError: lengths differ, the split is empty, or a file is missing (naming the CSV and row).
    """
    if not images:
        raise SplitError(f"split {name!r} is empty (no image rows)")
    if subjects is not None and len(subjects) != len(images):
        raise SplitError(f"split {name!r}: {len(images)} image rows but {len(subjects)} subject entries")
    for kind, other in (("labels", labels), ("masks", masks)):
        if other is not None and len(other) != len(images):
            raise SplitError(f"split {name!r}: {len(images)} image rows but {len(other)} {kind} rows; "
                             "label and mask CSVs must be row-aligned with the image CSVs")
    records = []
    for i, (image, source) in enumerate(images):
        label = labels[i] if labels is not None else None
        mask = masks[i] if masks is not None else None
        for path, where in (p for p in ((image, source), label, mask) if p is not None):
            if not path.is_file():
                raise SplitError(f"split {name!r}: file not found: {path} ({where})")
        records.append(Record(image=image, anomaly_mask=label[0] if label else None,
                              brain_mask=mask[0] if mask else None, source=source,
                              subject=subjects[i] if subjects is not None else None))
    return records


def load_record(record: Record, *, target_size: Sequence[int],
                intensity: Intensity) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Decode and preprocess one record.

    Returns:
        image [H,W] float32 in [0,1]; anomaly mask and brain mask [H,W] uint8 in {0,1} or None.

    Raises:
        DataReadError: a file is unreadable, or a mask's shape differs from its image's.
    """
    raw = read_slice(record.image, source=record.source)
    try:
        image = preprocess_image(raw, target_size=target_size, intensity=intensity)
    except ValueError as err:
        raise DataReadError(f"{record.image}: {err} ({record.source})") from err
    out: list[np.ndarray | None] = []
    for path in (record.anomaly_mask, record.brain_mask):
        if path is None:
            out.append(None)
            continue
        mask = read_slice(path, source=record.source)
        if mask.shape != raw.shape:
            raise DataReadError(f"{path}: mask shape {mask.shape} differs from image {record.image} shape "
                                f"{raw.shape} ({record.source})")
        out.append(preprocess_mask(mask, target_size=target_size).astype(np.uint8))
    return image, out[0], out[1]


def shared_subjects(a: Sequence[Record], b: Sequence[Record]) -> list[str]:
    """Sorted subject ids named (``subject`` column) in both record lists; rows without one are not compared."""
    return sorted({r.subject for r in a if r.subject is not None} & {r.subject for r in b if r.subject is not None})


class _DecodeDataset(Dataset):
    """Decodes records; used once to fill a cache, possibly in worker processes."""

    def __init__(self, records: Sequence[Record], target_size: tuple[int, int], intensity: Intensity) -> None:
        self.records, self.target_size, self.intensity = list(records), target_size, intensity

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray, np.ndarray | None, np.ndarray | None]:
        return (index, *load_record(self.records[index], target_size=self.target_size, intensity=self.intensity))


def _identity(item: tuple) -> tuple:
    """A picklable no-op ``collate_fn``."""
    return item


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


class SliceStore:
    """The preprocessed slices of one split, decoded once and cached (see the module docstring).

    Args:
        name: split name (for messages and the disk cache folder).
        records: the split's rows.
        label: image-level label of every slice (0 healthy, 1 pathological).
        target_size: (H, W) of every returned slice.
        intensity: the [0,1] scaling rule (:mod:`data.preprocess`).
        cache: ``'memory'``, ``'disk'`` or ``'none'``.
        cache_dir: folder of the disk cache (used only with ``cache='disk'``).
        split_files: the CSVs the records came from (their bytes enter the cache key).
        num_workers: processes used to decode when the cache is filled.
    """

    def __init__(self, *, name: str, records: Sequence[Record], label: int, target_size: Sequence[int],
                 intensity: Intensity, cache: CacheMode = "memory", cache_dir: Path | None = None,
                 split_files: Sequence[Path] = (), num_workers: int = 0) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache {cache!r} is not one of {', '.join(CACHE_MODES)}")
        check_intensity(intensity)
        if cache == "disk" and cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        self.name = name
        self.records = list(records)
        self.label = int(label)
        self.target_size = (int(target_size[0]), int(target_size[1]))
        self.intensity = intensity
        self.cache = cache
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.split_files = [Path(p) for p in split_files]
        self.num_workers = num_workers
        self.has_anomaly_mask = all(r.anomaly_mask is not None for r in self.records)
        self.has_brain_mask = all(r.brain_mask is not None for r in self.records)
        self.has_subjects = all(r.subject is not None for r in self.records)
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.records)

    # ------------------------------------------------------------------------------------------- caching
    def cache_key(self) -> str:
        """Hex digest over version, preprocessing settings, split CSV bytes and file fingerprints."""
        h = hashlib.sha256()
        h.update(json.dumps({"version": CACHE_VERSION, "target_size": self.target_size,
                             "intensity": self.intensity}).encode())
        for csv_path in self.split_files:
            h.update(str(csv_path).encode())
            h.update(hashlib.sha256(csv_path.read_bytes()).digest())
        for r in self.records:
            for path in (r.image, r.anomaly_mask, r.brain_mask):
                h.update((_file_fingerprint(path) if path is not None else "-").encode())
        return h.hexdigest()[:20]

    def _decode_all(self) -> dict[str, np.ndarray]:
        n, (height, width) = len(self.records), self.target_size
        arrays = {"image": np.empty((n, height, width), np.float32)}
        if self.has_anomaly_mask:
            arrays["anomaly"] = np.empty((n, height, width), np.uint8)
        if self.has_brain_mask:
            arrays["brain"] = np.empty((n, height, width), np.uint8)
        decoder = _DecodeDataset(self.records, self.target_size, self.intensity)
        loader = DataLoader(decoder, batch_size=None, shuffle=False, num_workers=self.num_workers,
                            collate_fn=_identity)
        for index, image, anomaly, brain in loader:
            arrays["image"][index] = image
            if "anomaly" in arrays:
                arrays["anomaly"][index] = anomaly
            if "brain" in arrays:
                arrays["brain"][index] = brain
        return arrays

    def _disk_arrays(self) -> dict[str, np.ndarray]:
        assert self.cache_dir is not None
        folder = self.cache_dir / f"{self.name}-{self.cache_key()}"
        if not (folder / "done.json").is_file():
            logger.info("decoding split %r (%d slices) into the disk cache %s", self.name, len(self), folder)
            arrays = self._decode_all()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=self.cache_dir))
            for key, array in arrays.items():
                np.save(tmp / f"{key}.npy", array)
            (tmp / "done.json").write_text(json.dumps({"split": self.name, "n": len(self),
                                                       "records": [str(r.image) for r in self.records[:3]]}))
            try:
                os.rename(tmp, folder)
            except OSError:  # another process finished the same cache first: keep theirs
                shutil.rmtree(tmp)
                if not (folder / "done.json").is_file():
                    raise
        return {p.stem: np.load(p, mmap_mode="r", allow_pickle=False) for p in folder.glob("*.npy")}

    def materialize(self) -> None:
        """Fill the cache now (no-op when ``cache='none'`` or already filled)."""
        if self.cache == "none" or self._arrays is not None:
            return
        if self.cache == "memory":
            logger.info("decoding split %r (%d slices) into memory", self.name, len(self))
            self._arrays = self._decode_all()
        else:
            self._arrays = self._disk_arrays()

    # ------------------------------------------------------------------------------------------- access
    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        if self.cache == "none":
            image, anomaly, brain = load_record(record, target_size=self.target_size, intensity=self.intensity)
        else:
            self.materialize()
            assert self._arrays is not None
            image = self._arrays["image"][index]
            anomaly = self._arrays["anomaly"][index] if "anomaly" in self._arrays else None
            brain = self._arrays["brain"][index] if "brain" in self._arrays else None

        def tensor(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(np.array(a, dtype=np.float32))[None]

        return Sample(image=tensor(image), anomaly_mask=tensor(anomaly), brain_mask=tensor(brain),
                      label=self.label, path=str(record.image), subject=record.subject or str(record.image))


class SliceDataset(Dataset):
    """A view of a :class:`SliceStore`, optionally passing each sample through ``transforms`` in order.

    Args:
        store: the split's slices.
        transforms: callables ``Sample -> Sample`` (augmentation, training split only).
    """

    def __init__(self, store: SliceStore, transforms: Sequence[Callable[[Sample], Sample]] = ()) -> None:
        self.store = store
        self.transforms = list(transforms)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> Sample:
        sample = self.store[index]
        for transform in self.transforms:
            sample = transform(sample)
        return sample
