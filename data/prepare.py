"""Preparation CLIs: public datasets in their native layout -> 2-D slices, masks and split CSVs.

Usage::

    python -m data.prepare ixi     --src IXI-T1/            --out data/prepared/ixi
    python -m data.prepare fastmri --src multicoil_train/   --out data/prepared/fastmri --annotations brain.csv
    python -m data.prepare atlas   --src ATLAS_2/Training/  --out data/prepared/atlas
    python -m data.prepare brats   --src BraTS2021/         --out data/prepared/brats

Every tool writes ``<out>/images/<name>.npy`` (float32 [H,W], the raw intensities of the slice: no precision
lost, no scaling; ``DataModule`` scales to [0,1] by its one rule), ``<out>/masks/<name>.npy`` (uint8 brain /
foreground or healthy-tissue mask), ``<out>/labels/<name>.npy`` (uint8 anomaly mask) and split CSVs in
``<out>/splits/`` (header ``filename``; label and mask CSVs row-aligned with the image CSV; file names relative to
the repository root when ``--out`` lies inside it, else absolute). Slices are in display orientation: volumes
are reoriented to the closest canonical (RAS+) orientation, the axial slice ``k`` is ``volume[:, :, k]``, shown
anterior-up (``flipud(slice.T)``, as :mod:`data.readers` does).

Masks:
- ``foreground``: voxels above 10 % of the slice's 99th intensity percentile, holes filled, largest connected
  component, one closing step. For skull-stripped data (ATLAS, BraTS, registered IXI) this is the brain mask; for
  fastMRI (not skull-stripped) it is the head foreground, as in the reference study.
- anomaly masks: ATLAS ``label-L`` lesion masks and BraTS segmentations (all tumour labels) binarised (> 0);
  fastMRI+ boxes (one mask per annotation row).

Subjects: every image CSV has a ``subject`` column (the volume a slice comes from: the IXI subject id, the
fastMRI file id, the ATLAS subject, the BraTS case) and a ``slice`` column (its axial index); ``--n-slices`` takes
that many consecutive slices per volume, and all slices of a subject stay in one split. fastMRI publishes no
patient ids: a file (one study) is a subject, so two studies of one patient could still land in two splits.

Dataset specifics:
- ``ixi``: every ``*T1*.nii*`` under ``--src`` (recursive), slices chosen by ``--slice`` / ``--n-slices`` (default:
  the middle axial slice), healthy; subjects split into train/val/test by ``--val-fraction`` /
  ``--test-fraction`` with ``--seed`` (all slices of a subject stay in one split).
- ``fastmri``: every ``*.h5`` under ``--src`` (``--pattern '*_AXT1_*.h5'`` keeps only T1); the middle slice of
  ``reconstruction_rss`` (index ``n // 2``), or ``--n-slices`` consecutive slices centred on it.
  fastMRI+ boxes refer to the slice flipped up-down (y counted from the bottom of the stored array; the
  fastMRI+ viewers flip with ``[:, ::-1, :]``), so the slice is stored flipped (anterior up) and boxes are drawn
  in it directly (``--no-flip`` keeps the stored orientation for boxes given in it). The fastMRI+ CSV (columns
  ``file,slice,study_level,x,y,width,height,label``; ``slice`` 0-based, x = column, y = row) gives, for each
  chosen slice, one row per box annotation grouped by
  label into ``<label>.csv`` / ``<label>_label.csv`` (box mask) / ``<label>_mask.csv`` (healthy tissue = foreground
  minus all boxes of that slice). Study-level rows (``study_level`` yes) are image-level labels, never boxes:
  ``study_level.csv`` (columns ``filename,label``, one row per chosen slice) + ``study_level_mask.csv``. A chosen
  slice of an annotated file without a box of its own is neither a box row nor healthy. Files with no annotation
  row at all are healthy: ``healthy_{train,val,test}.csv`` (+ ``_mask``), split by file. Labels are normalised to
  lowercase identifiers (``Nonspecific lesion`` -> ``nonspecific_lesion``); ``--merge SRC=DST`` renames classes
  (default ``extra_axial_mass=mass``, the reference study's "mass incl. extra-axial").
- ``atlas``: BIDS ``*_T1w.nii.gz`` with ``*_label-L_desc-T1lesion_mask.nii.gz``; axial slice ``--slice``
  (default 95, the reference study's slice of the 197x233x189 MNI volumes); ``atlas.csv`` has ``lesion_px``.
- ``brats``: per case ``*_t1.nii.gz`` / ``*_t2.nii.gz`` / ``*_flair.nii.gz`` (``--modality``) and ``*_seg.nii.gz``;
  ``--slice`` (default: middle) or ``--slice max-tumour`` (the axial slice with the largest tumour area).
"""

from __future__ import annotations

import argparse
import csv
import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ATLAS_IMAGE_SUFFIX = "_T1w.nii.gz"
ATLAS_MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"


class PrepareError(Exception):
    """The source folder does not hold what the tool expects."""


# ---------------------------------------------------------------------------------------------------- helpers
def foreground_mask(image: np.ndarray) -> np.ndarray:
    """[H,W] foreground mask (see the module docstring) as uint8 {0,1}."""
    positive = image[image > 0]
    if positive.size == 0:
        return np.zeros(image.shape, np.uint8)
    mask = image > 0.1 * float(np.percentile(positive, 99))
    mask = ndi.binary_fill_holes(mask)
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum(mask, labels, index=np.arange(1, n + 1))
        mask = labels == int(np.argmax(sizes)) + 1
    mask = ndi.binary_fill_holes(ndi.binary_closing(mask, iterations=1))
    return mask.astype(np.uint8)


def load_volume(path: Path) -> np.ndarray:
    """A 3-D NIfTI volume reoriented to the closest canonical (RAS+) orientation, float32."""
    import nibabel as nib

    img = nib.load(str(path))
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise PrepareError(f"{path}: expected a 3-D volume, got shape {img.shape}")
    return np.asarray(nib.as_closest_canonical(img).dataobj, dtype=np.float32)


def axial(volume: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` of a canonical volume in display orientation (anterior up)."""
    if not 0 <= k < volume.shape[2]:
        raise PrepareError(f"slice {k} is outside the volume's {volume.shape[2]} axial slices")
    return np.ascontiguousarray(np.flipud(volume[:, :, k].T))


def slice_indices(n: int, *, slice_index: int | None, n_slices: int) -> list[int]:
    """``n_slices`` consecutive indices centred on ``slice_index`` (default: the middle, ``n // 2``).

    Raises:
        PrepareError: ``n_slices`` < 1, or the range leaves the volume's ``n`` slices.
    """
    if n_slices < 1:
        raise PrepareError(f"--n-slices must be >= 1, got {n_slices}")
    centre = n // 2 if slice_index is None else slice_index
    start = centre - (n_slices - 1) // 2
    if start < 0 or start + n_slices > n:
        raise PrepareError(f"slices {start}..{start + n_slices - 1} (--n-slices {n_slices} around {centre}) leave the "
                           f"volume's {n} slices")
    return list(range(start, start + n_slices))


def csv_text(path: Path) -> str:
    """Path as written into split CSVs: relative to the repository root when inside it, else absolute."""
    path = path.resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """Write rows (dicts with the same keys, ``filename`` first) to ``path``."""
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %s (%d rows)", path, len(rows))


def save(out: Path, kind: str, name: str, array: np.ndarray) -> str:
    """Save ``array`` to ``<out>/<kind>/<name>.npy`` and return its CSV text."""
    path = out / kind / f"{name}.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return csv_text(path)


def normalise_label(label: str) -> str:
    """``'Nonspecific white matter lesion'`` -> ``'nonspecific_white_matter_lesion'``."""
    return re.sub(r"[^0-9a-z]+", "_", label.strip().lower()).strip("_") or "unlabelled"


def split_subjects(subjects: Sequence[str], *, val_fraction: float, test_fraction: float,
                   seed: int) -> dict[str, str]:
    """Assign subjects to ``train``/``val``/``test`` (sorted, then a seeded permutation)."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise PrepareError(f"need 0 <= val, test fractions and val + test < 1, got {val_fraction}, {test_fraction}")
    order = sorted(set(subjects))
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val, n_test = round(val_fraction * len(order)), round(test_fraction * len(order))
    out = {}
    for rank, i in enumerate(perm):
        out[order[i]] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
    return out


def _find(src: Path, pattern: str) -> list[Path]:
    if not src.is_dir():
        raise PrepareError(f"--src {src} is not a folder")
    files = sorted(p for p in src.rglob(pattern) if p.is_file())
    if not files:
        raise PrepareError(f"no files matching {pattern!r} under {src}")
    return files


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# ---------------------------------------------------------------------------------------------------- tools
def prepare_ixi(*, src: Path, out: Path, slice_index: int | None = None, n_slices: int = 1,
                val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0) -> dict[str, int]:
    """IXI T1 volumes -> healthy slices + foreground masks, split by subject. Returns rows per split."""
    files = _find(src, "*T1*.nii*")
    subjects = {f: _stem(f).split("-")[0] for f in files}
    assignment = split_subjects(list(subjects.values()), val_fraction=val_fraction, test_fraction=test_fraction,
                                seed=seed)
    rows: dict[str, list[dict]] = defaultdict(list)
    masks: dict[str, list[dict]] = defaultdict(list)
    for f in files:
        volume = load_volume(f)
        for k in slice_indices(volume.shape[2], slice_index=slice_index, n_slices=n_slices):
            image = axial(volume, k)
            name = f"{_stem(f)}_z{k:03d}"
            split = assignment[subjects[f]]
            rows[split].append({"filename": save(out, "images", name, image), "subject": subjects[f], "slice": k})
            masks[split].append({"filename": save(out, "masks", name, foreground_mask(image))})
    for split in rows:
        write_csv(out / "splits" / f"ixi_{split}.csv", rows[split])
        write_csv(out / "splits" / f"ixi_{split}_mask.csv", masks[split])
    return {split: len(r) for split, r in rows.items()}


def _read_annotations(path: Path) -> dict[str, list[dict]]:
    required = ("file", "slice", "study_level", "x", "y", "width", "height", "label")
    if not path.is_file():
        raise PrepareError(f"--annotations {path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise PrepareError(f"{path}: missing columns {missing}; expected {', '.join(required)}")
        by_file: dict[str, list[dict]] = defaultdict(list)
        for n, row in enumerate(reader, start=1):
            row["_row"] = n
            by_file[row["file"].strip().removesuffix(".h5")].append(row)
    return by_file


def _is_yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "1", "y")


def _parse_merge(merge: Sequence[str]) -> dict[str, str]:
    renames = {}
    for item in merge:
        if "=" not in item:
            raise PrepareError(f"--merge {item!r}: expected SRC=DST")
        a, b = item.split("=", 1)
        renames[normalise_label(a)] = normalise_label(b)
    return renames


def _middle_slices(path: Path, flip: bool, n_slices: int) -> list[tuple[int, np.ndarray]]:
    """(index, float32 [H,W] slice flipped up-down when ``flip``) of ``reconstruction_rss`` for ``n_slices``
    consecutive slices centred on the middle one (index ``n // 2``)."""
    import h5py

    with h5py.File(path, "r") as h5:
        if "reconstruction_rss" not in h5:
            raise PrepareError(f"{path}: no 'reconstruction_rss' dataset")
        volume = h5["reconstruction_rss"]
        try:
            indices = slice_indices(volume.shape[0], slice_index=None, n_slices=n_slices)
        except PrepareError as err:
            raise PrepareError(f"{path}: {err}") from err
        out = [(k, np.asarray(volume[k], dtype=np.float32)) for k in indices]
    return [(k, np.ascontiguousarray(np.flipud(image)) if flip else image) for k, image in out]


def _box_mask(row: dict, shape: tuple[int, ...], where: str) -> np.ndarray:
    """uint8 [H,W] mask of one fastMRI+ box (x = column, y = row of the image the boxes refer to)."""
    x, y, w, h = (int(round(float(row[k]))) for k in ("x", "y", "width", "height"))
    box = np.zeros(shape, np.uint8)
    box[max(y, 0): max(y + h, 0), max(x, 0): max(x + w, 0)] = 1
    if not box.any():
        raise PrepareError(f"{where}: box x={x}, y={y}, width={w}, height={h} lies outside the {shape} slice")
    return box


def prepare_fastmri(*, src: Path, out: Path, annotations: Path, val_fraction: float = 0.1,
                    test_fraction: float = 0.2, seed: int = 0, merge: Sequence[str] = ("extra_axial_mass=mass",),
                    flip: bool = True, pattern: str = "*.h5", n_slices: int = 1) -> dict[str, int]:
    """fastMRI brain HDF5 + fastMRI+ boxes -> middle slices, per-class triples, study-level and healthy lists."""
    renames = _parse_merge(merge)
    by_file = _read_annotations(annotations)
    classes: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"": [], "_label": [], "_mask": []})
    study, study_masks, healthy = [], [], []
    for f in _find(src, pattern):
        stem = _stem(f)
        rows = by_file.get(stem, [])
        study_labels = sorted({normalise_label(r["label"]) for r in rows if _is_yes(r["study_level"])})
        for k, image in _middle_slices(f, flip, n_slices):
            name, where = f"{stem}_s{k:02d}", {"subject": stem, "slice": k}
            foreground = foreground_mask(image)
            if not rows:
                healthy.append((stem, {"filename": save(out, "images", name, image), **where},
                                {"filename": save(out, "masks", name, foreground)}))
                continue
            for label in study_labels:
                study.append({"filename": save(out, "images", name, image), "label": renames.get(label, label),
                              **where})
                study_masks.append({"filename": save(out, "masks", name, foreground)})
            boxes = []
            for row in rows:
                if _is_yes(row["study_level"]) or int(row["slice"]) != k:
                    continue
                box = _box_mask(row, image.shape, f"{annotations} row {row['_row']} ({f.name})")
                label = normalise_label(row["label"])
                boxes.append((renames.get(label, label), box, row["_row"]))
            if boxes:
                image_text = save(out, "images", name, image)
                healthy_tissue = foreground * (1 - np.max([b for _, b, _ in boxes], axis=0))
                mask_text = save(out, "masks", f"{name}_healthy_tissue", healthy_tissue.astype(np.uint8))
                for label, box, row_n in boxes:
                    classes[label][""].append({"filename": image_text, **where, "annotation_row": row_n})
                    classes[label]["_label"].append({"filename": save(out, "labels", f"{name}_row{row_n}", box)})
                    classes[label]["_mask"].append({"filename": mask_text})
    for label, table in classes.items():
        for suffix, entries in table.items():
            write_csv(out / "splits" / f"{label}{suffix}.csv", entries)
    write_csv(out / "splits" / "study_level.csv", study)
    write_csv(out / "splits" / "study_level_mask.csv", study_masks)
    assignment = split_subjects([h[0] for h in healthy], val_fraction=val_fraction, test_fraction=test_fraction,
                                seed=seed) if healthy else {}
    counts = {label: len(t[""]) for label, t in classes.items()}
    for split in ("train", "val", "test"):
        chosen = [h for h in healthy if assignment[h[0]] == split]
        write_csv(out / "splits" / f"healthy_{split}.csv", [h[1] for h in chosen])
        write_csv(out / "splits" / f"healthy_{split}_mask.csv", [h[2] for h in chosen])
        counts[f"healthy_{split}"] = len(chosen)
    counts["study_level"] = len(study)
    return counts


class _LesionSlices:
    """Image/label/mask rows of one pathological set, written as a row-aligned CSV triple."""

    def __init__(self, out: Path) -> None:
        self.out, self.images, self.labels, self.masks = out, [], [], []

    def add(self, name: str, image: np.ndarray, label: np.ndarray, brain: np.ndarray, **info: Any) -> None:
        self.images.append({"filename": save(self.out, "images", name, image), **info,
                            "lesion_px": int(label.sum())})
        self.labels.append({"filename": save(self.out, "labels", name, label)})
        self.masks.append({"filename": save(self.out, "masks", name, brain)})

    def write(self, stem: str) -> dict[str, int]:
        for suffix, rows in (("", self.images), ("_label", self.labels), ("_mask", self.masks)):
            write_csv(self.out / "splits" / f"{stem}{suffix}.csv", rows)
        return {stem: len(self.images)}


def prepare_atlas(*, src: Path, out: Path, slice_index: int | None = 95, n_slices: int = 1) -> dict[str, int]:
    """ATLAS v2 BIDS volumes -> axial slices, binarised lesion masks and foreground masks."""
    slices = _LesionSlices(out)
    for f in _find(src, f"*{ATLAS_IMAGE_SUFFIX}"):
        mask_path = f.with_name(f.name[: -len(ATLAS_IMAGE_SUFFIX)] + ATLAS_MASK_SUFFIX)
        if not mask_path.is_file():
            raise PrepareError(f"{f}: lesion mask {mask_path.name} not found next to it")
        volume, lesion = load_volume(f), load_volume(mask_path)
        if volume.shape != lesion.shape:
            raise PrepareError(f"{mask_path}: shape {lesion.shape} differs from {f} shape {volume.shape}")
        subject = f.name.split("_")[0]
        for k in slice_indices(volume.shape[2], slice_index=slice_index, n_slices=n_slices):
            image, label = axial(volume, k), (axial(lesion, k) > 0).astype(np.uint8)
            slices.add(f"{_stem(f)}_z{k:03d}", image, label, foreground_mask(image), subject=subject, slice=k)
    return slices.write("atlas")


def prepare_brats(*, src: Path, out: Path, modality: str = "t1", slice_index: int | str | None = None,
                  n_slices: int = 1) -> dict[str, int]:
    """BraTS cases -> axial slices of one modality, binarised tumour masks (all labels) and brain masks."""
    if modality not in ("t1", "t2", "flair", "t1ce"):
        raise PrepareError(f"--modality {modality!r} is not one of t1, t2, flair, t1ce")
    slices = _LesionSlices(out)
    for seg_path in _find(src, "*_seg.nii*"):
        case = seg_path.name.split("_seg.nii")[0]
        candidates = sorted(seg_path.parent.glob(f"{case}_{modality}.nii*"))
        if not candidates:
            raise PrepareError(f"{seg_path.parent}: no {case}_{modality}.nii(.gz) next to {seg_path.name}")
        volume, seg = load_volume(candidates[0]), load_volume(seg_path)
        if volume.shape != seg.shape:
            raise PrepareError(f"{seg_path}: shape {seg.shape} differs from {candidates[0]} shape {volume.shape}")
        if slice_index == "max-tumour":
            centre: int | None = int(np.argmax((seg > 0).sum(axis=(0, 1))))
        else:
            centre = None if slice_index is None else int(slice_index)
        for k in slice_indices(volume.shape[2], slice_index=centre, n_slices=n_slices):
            image, label = axial(volume, k), (axial(seg, k) > 0).astype(np.uint8)
            slices.add(f"{case}_{modality}_z{k:03d}", image, label, (image > 0).astype(np.uint8), subject=case,
                       slice=k)
    return slices.write("brats")


# ---------------------------------------------------------------------------------------------------- CLI
def _slice_arg(text: str) -> int | str:
    if text == "max-tumour":
        return text
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer slice index, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m data.prepare`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description="Prepare public datasets as "
                                     "2-D slices, masks and split CSVs (see data/prepare.py).")
    sub = parser.add_subparsers(dest="dataset", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--src", type=Path, required=True, help="the dataset in its native layout")
    common.add_argument("--out", type=Path, required=True, help="output folder (e.g. data/prepared/<dataset>)")
    fractions = argparse.ArgumentParser(add_help=False)
    fractions.add_argument("--seed", type=int, default=0, help="seed of the subject split")
    ixi = sub.add_parser("ixi", parents=[common, fractions], help="IXI T1 NIfTI volumes (healthy)")
    ixi.add_argument("--slice", type=int, default=None, help="axial slice index (default: middle)")
    ixi.add_argument("--n-slices", type=int, default=1, help="consecutive slices centred on --slice")
    ixi.add_argument("--val-fraction", type=float, default=0.0)
    ixi.add_argument("--test-fraction", type=float, default=0.0)
    fm = sub.add_parser("fastmri", parents=[common, fractions], help="fastMRI brain HDF5 + fastMRI+ annotations")
    fm.add_argument("--annotations", type=Path, required=True, help="fastMRI+ brain.csv")
    fm.add_argument("--val-fraction", type=float, default=0.1)
    fm.add_argument("--test-fraction", type=float, default=0.2)
    fm.add_argument("--pattern", default="*.h5", help="file pattern under --src (e.g. '*_AXT1_*.h5')")
    fm.add_argument("--n-slices", type=int, default=1, help="consecutive slices centred on the middle one")
    fm.add_argument("--merge", action="append", default=None, help="SRC=DST class rename (repeatable)")
    fm.add_argument("--no-flip", action="store_true",
                    help="keep slices as stored (only for boxes given in the stored orientation)")
    atlas = sub.add_parser("atlas", parents=[common], help="ATLAS v2 BIDS (T1w + lesion masks)")
    atlas.add_argument("--slice", type=int, default=95, help="axial slice index (default: 95)")
    atlas.add_argument("--n-slices", type=int, default=1)
    brats = sub.add_parser("brats", parents=[common], help="BraTS cases (modalities + seg)")
    brats.add_argument("--modality", default="t1", choices=("t1", "t2", "flair", "t1ce"))
    brats.add_argument("--slice", type=_slice_arg, default=None, help="index, or max-tumour (default: middle)")
    brats.add_argument("--n-slices", type=int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints the number of rows written per split."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset == "ixi":
        counts = prepare_ixi(src=args.src, out=args.out, slice_index=args.slice, n_slices=args.n_slices,
                             val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed)
    elif args.dataset == "fastmri":
        counts = prepare_fastmri(src=args.src, out=args.out, annotations=args.annotations,
                                 val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                                 merge=args.merge if args.merge is not None else ("extra_axial_mass=mass",),
                                 flip=not args.no_flip, pattern=args.pattern, n_slices=args.n_slices)
    elif args.dataset == "atlas":
        counts = prepare_atlas(src=args.src, out=args.out, slice_index=args.slice, n_slices=args.n_slices)
    else:
        counts = prepare_brats(src=args.src, out=args.out, modality=args.modality, slice_index=args.slice,
                               n_slices=args.n_slices)
    for split, n in sorted(counts.items()):
        print(f"{split}: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
