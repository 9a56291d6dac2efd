"""The data slot: ``DataModule`` turns the YAML ``data:`` block into loaders of :class:`data.batch.Batch`.

A config names its splits; each split spec is a mapping with these keys (anything else is an error):

- ``images``: list of split CSVs (header ``filename``, one path per row), concatenated in order; or
- ``glob``: a file pattern (e.g. ``data/healthy/*.png``), sorted; exactly one of ``images`` / ``glob``.
- ``labels``: list of anomaly-mask CSVs, row-aligned with the images (optional).
- ``masks``: list of brain / healthy-tissue mask CSVs, row-aligned with the images (optional).
- ``pathological``: image-level label of the whole split (default: true when ``labels`` are given).
- ``annotation``: ``'pixel'`` or ``'box'`` (what the labels are; default ``'pixel'`` when labels are given).
- ``max_samples``: keep only the first N rows (deterministic), or null for all.

Paths: relative paths (split CSVs, globs, and the file names inside the CSVs) are resolved against the
**repository root** (the parent folder of ``core/``), never the working directory. A path that starts with
``$prepared/`` is resolved against the folder returned by the ``prepare`` block (see
:class:`data.preparer.DatasetPreparer`), e.g. the embedded benchmark's cache folder.

Construction only validates the configuration (keys, types, the ``prepare`` and ``augmentation`` blocks);
CSVs and images are read on first use of a split, so ``--dry-run`` works without data on disk. Every loader
yields :class:`data.batch.Batch`. Only :meth:`DataModule.train_dataloader` augments and shuffles.
"""

from __future__ import annotations

import glob as globlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from core.Configurator import build
from data.batch import collate
from data.dataset import (
    CACHE_MODES,
    CacheMode,
    SliceDataset,
    SliceStore,
    SplitError,
    build_records,
    read_split_csv,
    read_subjects,
    resolve,
    shared_subjects,
)
from data.preparer import DatasetPreparer
from data.preprocess import INTENSITY_RULES, Intensity
from data.transforms import SampleTransform

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PREPARED_TOKEN = "$prepared"
SPLIT_KEYS = ("images", "glob", "labels", "masks", "pathological", "annotation", "max_samples")
Annotation = Literal["pixel", "box"]
ANNOTATIONS: tuple[str, ...] = get_args(Annotation)
RESERVED_NAMES = ("train", "val")


@dataclass(frozen=True)
class DatasetInfo:
    """What an evaluation task needs to know about a split.

    Attributes:
        name: ``'train'``, ``'val'`` or a test-set name.
        pathological: image-level label of the split.
        has_anomaly_mask: batches carry ``anomaly_mask``.
        has_brain_mask: batches carry ``brain_mask`` (brain or healthy-tissue mask).
        annotation: ``'pixel'`` or ``'box'`` when the split has anomaly masks, else None.
        size: number of slices.
        has_subjects: the image CSVs name each row's subject (else each image is its own subject).
    """

    name: str
    pathological: bool
    has_anomaly_mask: bool
    has_brain_mask: bool
    annotation: str | None
    size: int
    has_subjects: bool = False


@dataclass(frozen=True)
class SplitSpec:
    """A validated split mapping (see the module docstring)."""

    name: str
    images: tuple[str, ...]
    glob: str | None
    labels: tuple[str, ...] | None
    masks: tuple[str, ...] | None
    pathological: bool
    annotation: str | None
    max_samples: int | None


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: expected a non-empty list of paths, got {value!r}")
    return tuple(value)


def parse_split(name: str, spec: Any, where: str) -> SplitSpec:
    """Validate one split mapping strictly.

    Args:
        name: split name.
        spec: the YAML mapping.
        where: its YAML path for messages (e.g. ``test.atlas``).

    Raises:
        ValueError: naming the YAML path and the bad key or value.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping with keys {', '.join(SPLIT_KEYS)}, got {spec!r}")
    for key in spec:
        if key not in SPLIT_KEYS:
            raise ValueError(f"{where}.{key}: unknown key; valid keys: {', '.join(SPLIT_KEYS)}")
    if ("images" in spec) == ("glob" in spec):
        raise ValueError(f"{where}: give exactly one of 'images' (split CSVs) or 'glob' (a file pattern)")
    images = _str_list(spec["images"], f"{where}.images") if "images" in spec else ()
    pattern = spec.get("glob")
    if pattern is not None and (not isinstance(pattern, str) or not pattern):
        raise ValueError(f"{where}.glob: expected a file pattern, got {pattern!r}")
    labels = _str_list(spec["labels"], f"{where}.labels") if spec.get("labels") is not None else None
    masks = _str_list(spec["masks"], f"{where}.masks") if spec.get("masks") is not None else None
    pathological = spec.get("pathological", labels is not None)
    if not isinstance(pathological, bool):
        raise ValueError(f"{where}.pathological: expected true or false, got {pathological!r}")
    annotation = spec.get("annotation", "pixel" if labels is not None else None)
    if annotation is not None and annotation not in ANNOTATIONS:
        raise ValueError(f"{where}.annotation: {annotation!r} is not one of {', '.join(ANNOTATIONS)}")
    if annotation is not None and labels is None:
        raise ValueError(f"{where}.annotation: set to {annotation!r} but the split has no 'labels'")
    max_samples = spec.get("max_samples")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"{where}.max_samples: expected a positive integer or null, got {max_samples!r}")
    return SplitSpec(name=name, images=images, glob=pattern, labels=labels, masks=masks, pathological=pathological,
                     annotation=annotation, max_samples=max_samples)


class DataModule:
    """Builds the train / val / named test loaders from split specs (see the module docstring).

    Args:
        target_size: (H, W) of every slice.
        batch_size: training batch size.
        eval_batch_size: batch size of validation and evaluation loaders.
        num_workers: loader worker processes (also used to decode when a cache is filled).
        train: split spec of the healthy training set.
        val: split spec of the healthy validation set (thresholds, early stopping), or None.
        test: named test split specs; names ``'train'`` and ``'val'`` are reserved.
        augmentation: ``{module_name, class_name, params}`` blocks of :class:`data.transforms.SampleTransform`,
            applied in order to the training split only.
        intensity: the one [0,1] scaling rule (:mod:`data.preprocess`): ``'minmax'`` per image or
            ``'percentile'`` (per image clip to the 0.5/99.5 percentiles, then min-max).
        cache: ``'memory'``, ``'disk'`` (memory-mapped .npy under ``cache_dir``) or ``'none'``.
        cache_dir: disk cache folder (relative to the repository root unless absolute).
        prepare: a :class:`data.preparer.DatasetPreparer` block run before the splits are read.
        drop_last: drop the last incomplete training batch (training loader only; off by default).
        pin_memory: pin batches in page-locked memory (for GPU training).
    """

    def __init__(self, *, target_size: Sequence[int] = (128, 128), batch_size: int = 16, eval_batch_size: int = 16,
                 num_workers: int = 0, train: dict | None = None, val: dict | None = None,
                 test: dict[str, dict] | None = None, augmentation: list[dict] | None = None,
                 intensity: Intensity = "minmax", cache: CacheMode = "memory", cache_dir: str = "cache/slices",
                 prepare: dict | None = None, drop_last: bool = False, pin_memory: bool = False) -> None:
        if len(target_size) != 2 or not all(isinstance(s, int) and s > 0 for s in target_size):
            raise ValueError(f"target_size must be two positive integers, got {target_size!r}")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if intensity not in INTENSITY_RULES:
            raise ValueError(f"intensity {intensity!r} is not one of {', '.join(INTENSITY_RULES)}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache {cache!r} is not one of {', '.join(CACHE_MODES)}")
        if train is None:
            raise ValueError("train: a training split spec is required")
        self.target_size = (int(target_size[0]), int(target_size[1]))
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.intensity, self.cache = intensity, cache
        self.cache_dir = resolve(cache_dir, REPO_ROOT)
        self.drop_last, self.pin_memory = drop_last, pin_memory
        self.specs: dict[str, SplitSpec] = {"train": parse_split("train", train, "train")}
        if val is not None:
            self.specs["val"] = parse_split("val", val, "val")
        for name, spec in (test or {}).items():
            if name in RESERVED_NAMES:
                raise ValueError(f"test.{name}: the names {', '.join(RESERVED_NAMES)} are reserved")
            self.specs[name] = parse_split(name, spec, f"test.{name}")
        self._test_names = list((test or {}).keys())
        self.transforms: list[SampleTransform] = [
            build(block, f"data.params.augmentation[{i}]", base=SampleTransform)
            for i, block in enumerate(augmentation or [])
        ]
        self.preparer: DatasetPreparer | None = (
            build(prepare, "data.params.prepare", base=DatasetPreparer) if prepare is not None else None
        )
        self._prepared_root: Path | None = None
        self._stores: dict[str, SliceStore] = {}
        self._csvs: dict[str, list[Path]] = {}

    # --------------------------------------------------------------------------------------------- paths
    def _prepared(self) -> Path:
        if self._prepared_root is None:
            if self.preparer is None:
                raise ValueError(f"a split path starts with {PREPARED_TOKEN!r} but data.params.prepare is not set")
            self._prepared_root = Path(self.preparer.prepare()).resolve()
        return self._prepared_root

    def _path(self, text: str) -> Path:
        if text == PREPARED_TOKEN or text.startswith(PREPARED_TOKEN + "/"):
            return self._prepared() / text[len(PREPARED_TOKEN):].lstrip("/")
        return resolve(text, REPO_ROOT)

    def _read_csvs(self, csvs: Sequence[str]) -> tuple[list[tuple[Path, str]], list[Path]]:
        rows, files = [], []
        for text in csvs:
            path = self._path(text)
            files.append(path)
            rows.extend(read_split_csv(path, REPO_ROOT))
        return rows, files

    # --------------------------------------------------------------------------------------------- splits
    def _store(self, name: str) -> SliceStore:
        if name in self._stores:
            return self._stores[name]
        if name not in self.specs:
            raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(self.specs)}")
        if self.preparer is not None:
            self._prepared()
        spec = self.specs[name]
        files: list[Path] = []
        if spec.glob is not None:
            pattern = str(self._path(spec.glob))
            matches = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
            images = [(p, f"glob {spec.glob}") for p in matches]
        else:
            images, files = self._read_csvs(spec.images)
        subjects = None if spec.glob is not None else [s for p in files for s in read_subjects(p)]
        labels = masks = None
        if spec.labels is not None:
            labels, more = self._read_csvs(spec.labels)
            files += more
        if spec.masks is not None:
            masks, more = self._read_csvs(spec.masks)
            files += more
        if spec.max_samples is not None:
            images = images[: spec.max_samples]
            labels = labels[: spec.max_samples] if labels is not None else None
            masks = masks[: spec.max_samples] if masks is not None else None
            subjects = subjects[: spec.max_samples] if subjects is not None else None
        try:
            records = build_records(images=images, labels=labels, masks=masks, name=name, subjects=subjects)
        except SplitError as err:
            where = [f"glob {spec.glob!r}" if spec.glob else f"image CSVs {', '.join(spec.images)}"]
            where += [f"{kind} CSVs {', '.join(csvs)}" for kind, csvs in (("labels", spec.labels),
                                                                         ("masks", spec.masks)) if csvs]
            raise SplitError(f"{err} [{'; '.join(where)}]") from err
        store = SliceStore(name=name, records=records, label=int(spec.pathological), target_size=self.target_size,
                           intensity=self.intensity, cache=self.cache, cache_dir=self.cache_dir, split_files=files,
                           num_workers=self.num_workers)
        self._stores[name], self._csvs[name] = store, files
        logger.info("split %r: %d slices (%s)", name, len(store), "pathological" if spec.pathological else "healthy")
        return store

    @property
    def test_set_names(self) -> list[str]:
        """The configured test-set names, in config order."""
        return list(self._test_names)

    def dataset_info(self, name: str) -> DatasetInfo:
        """Facts about split ``name`` (reads its CSVs on first call, does not decode images)."""
        store = self._store(name)
        spec = self.specs[name]
        return DatasetInfo(name=name, pathological=spec.pathological, has_anomaly_mask=store.has_anomaly_mask,
                           has_brain_mask=store.has_brain_mask, annotation=spec.annotation, size=len(store),
                           has_subjects=store.has_subjects)

    def split_files(self) -> list[Path]:
        """Every split CSV used by any split (absolute paths, de-duplicated, config order).

        Reads every split, and checks that no subject (the CSVs' ``subject`` column) of the training split is in
        the validation or a test split, and none of the validation split in a test split.

        Raises:
            SplitError: a subject is shared, naming both splits and a few of the subjects.
        """
        out: list[Path] = []
        for name in self.specs:
            self._store(name)
            out += [p.resolve() for p in self._csvs[name] if p.resolve() not in out]
        for first, later in (("train", [n for n in self.specs if n != "train"]), ("val", self._test_names)):
            for other in later if first in self.specs else []:
                shared = shared_subjects(self._stores[first].records, self._stores[other].records)
                if shared:
                    raise SplitError(f"splits {first!r} and {other!r} share {len(shared)} subject(s), e.g. "
                                     f"{', '.join(shared[:3])} (column 'subject' of their image CSVs); a subject "
                                     "must lie in one split only")
        return out

    # --------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: SliceDataset, *, batch_size: int, sampler: Any = None,
                drop_last: bool = False, generator: torch.Generator | None = None) -> DataLoader:
        dataset.store.materialize()
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=drop_last,
                          num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, generator=generator)

    def train_dataloader(self, *, rank: int = 0, world_size: int = 1, seed: int = 0) -> DataLoader:
        """Shuffled, augmented loader of the training split.

        With ``world_size > 1`` it uses a ``DistributedSampler`` (seeded with ``seed``; the trainer calls
        ``loader.sampler.set_epoch(epoch)``), else a ``RandomSampler`` driven by a generator seeded with
        ``seed`` (each pass draws a new order). The last incomplete batch is dropped only with
        ``drop_last: true``; without it a ``DistributedSampler`` repeats a few slices so that every process gets
        the same number (torch's behaviour).
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        dataset = SliceDataset(self._store("train"), self.transforms)
        generator = torch.Generator().manual_seed(seed)
        if world_size > 1:
            sampler: Any = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                              drop_last=self.drop_last)
        else:
            sampler = RandomSampler(dataset, generator=generator)
        if self.drop_last and len(dataset) // world_size < self.batch_size:
            raise ValueError(f"drop_last with batch_size {self.batch_size} leaves no batch: the training split "
                             f"has {len(dataset)} slices for {world_size} process(es)")
        return self._loader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last,
                            generator=generator)

    def val_dataloader(self) -> DataLoader | None:
        """Loader of the validation split (not augmented, not shuffled), or None without one."""
        return self.eval_dataloader("val") if "val" in self.specs else None

    def eval_dataloader(self, name: str) -> DataLoader:
        """Loader of ``'train'``, ``'val'`` or a test set: never augmented, never shuffled, all slices kept.

        Raises:
            KeyError: unknown name, listing the valid ones.
        """
        if name not in self.specs:
            raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(self.specs)}")
        return self._loader(SliceDataset(self._store(name)), batch_size=self.eval_batch_size)
