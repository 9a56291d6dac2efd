"""The user's scans: finding them, reading them as display-orientation slices, and writing maps back.

A 3-D NIfTI volume is reoriented to the closest canonical (RAS+) orientation and cut into axial slices
``k`` (inferior to superior), each shown anterior-up (``flipud(volume[:, :, k].T)``) exactly as the training
data were made (:mod:`data.readers`, :mod:`data.prepare`). A map computed on those slices is put back by the
inverse steps, so it has the input's voxel order, shape and affine. A 2-D NIfTI (or one with a single slice)
is one slice, ``flipud(data.T)`` as the reader does. PNG/JPEG/NPY/DICOM files are one slice each, read by
:func:`data.readers.read_slice`.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.Configurator import ConfigError
from data.dataset import SplitError, read_split_csv, resolve
from data.readers import (
    NIFTI_SUFFIXES,
    SUPPORTED_SUFFIXES,
    DataReadError,
    file_format,
    raised_by_format_library,
    read_slice,
)
from dl_utils.errors import DataError

logger = logging.getLogger(__name__)

_RAS = np.array([[0, 1], [1, 1], [2, 1]])


class BadInput(DataError):
    """An input that cannot be predicted on; the message names the file and the reason.

    Prediction skips it (``on_error: skip``) or stops at it (``'stop'``), as it does a
    :class:`data.readers.DataReadError` of an input.
    """


@dataclass(frozen=True)
class Scan:
    """One input, read and cut into slices.

    Attributes:
        path: the input file; mask_path: its brain mask or None.
        kind: ``'nifti'`` (2-D or 3-D NIfTI: outputs are NIfTI) or ``'image'`` (a 2-D file: outputs NPY + PNG).
        slices: [n,H,W] float32 raw values in display orientation.
        brain: [n,H,W] bool brain masks, or None.
        indices: the canonical axial index of each slice (0 for 2-D inputs).
        nifti: the input's nibabel image (shape, affine, header) for NIfTI inputs, else None.
        n_axial: number of axial slices of the whole volume (1 for 2-D inputs).
    """

    path: Path
    mask_path: Path | None
    kind: Literal["nifti", "image"]
    slices: np.ndarray
    brain: np.ndarray | None
    indices: list[int]
    nifti: Any
    n_axial: int


# ------------------------------------------------------------------------------------------------ finding
def _is_supported(path: Path) -> bool:
    return path.is_file() and str(path).lower().endswith(SUPPORTED_SUFFIXES)


_MAGIC = re.compile(r"[*?[]")


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:  # unreadable or vanished: glob skips such folders too, but say so
        logger.warning("predict: cannot list %s (%s); its files are not inputs", folder, err.strerror or err)
        return []


def _visible(name: str, part: str) -> bool:
    return part.startswith(".") or not name.startswith(".")


class _Glob:
    """One :func:`glob_files` expansion: the pattern's parts, the files found, the folders ``**`` entered."""

    def __init__(self, parts: tuple[str, ...]) -> None:
        self.parts = parts
        self.found: list[Path] = []
        self.entered: set[tuple[int, int, int]] = set()  # (device, inode, pattern part)

    def walk(self, path: Path, i: int) -> None:
        """Match ``parts[i:]`` below ``path``."""
        if i == len(self.parts):
            if path.is_file():
                self.found.append(path)
        elif self.parts[i] == "**":
            self.any_depth(path, i)
        elif _MAGIC.search(self.parts[i]):
            if path.is_dir():
                for child in _children(path):
                    if fnmatch.fnmatchcase(child.name, self.parts[i]) and _visible(child.name, self.parts[i]):
                        self.walk(child, i + 1)
        else:
            self.walk(path / self.parts[i], i + 1)

    def any_depth(self, path: Path, i: int) -> None:
        """``**`` at ``parts[i]``: no folder, or any visible subfolder; each folder entered once."""
        try:
            stat = path.stat()
        except OSError:
            return
        if (stat.st_dev, stat.st_ino, i) in self.entered or not path.is_dir():
            return
        self.entered.add((stat.st_dev, stat.st_ino, i))
        self.walk(path, i + 1)
        for child in _children(path):
            if not _visible(child.name, ""):
                continue
            if child.is_dir():
                self.any_depth(child, i)
            elif i + 1 == len(self.parts) and child.is_file():  # a trailing ``**`` matches files too
                self.found.append(child)


def glob_files(pattern: Path) -> list[Path]:
    """The files matching ``pattern``, sorted; ``**`` matches any number of folders.

    As ``glob.glob(pattern, recursive=True)``, with one difference: ``**`` enters each folder once (by device and
    inode), whichever path (symbolic link) leads there, so a link loop such as ``scans/again -> ..`` ends instead
    of growing paths without end, and a folder linked twice is read once. Names starting with ``.`` match only a
    pattern part that starts with ``.``; folders that cannot be listed are skipped with a warning.
    """
    parts = pattern.parts
    first = next((i for i, part in enumerate(parts) if _MAGIC.search(part)), len(parts))
    expansion = _Glob(parts)
    expansion.walk(Path(*parts[:first]), first)
    return sorted(expansion.found, key=str)


def expand(entries: list[str], key: str, root: Path) -> list[tuple[Path, str]]:
    """Folders, globs and CSVs -> ``(file, where it came from)`` in order (folders and globs sorted).

    A folder gives its supported files (not recursive); a glob the files it matches (see :func:`glob_files`:
    ``**`` follows no symbolic-link loop); a CSV its rows, as listed.

    Raises:
        ConfigError: naming ``predict.<key>[i]`` when an entry matches nothing or a CSV is malformed.
    """
    out: list[tuple[Path, str]] = []
    for i, text in enumerate(entries):
        where = f"predict.{key}[{i}]"
        path = resolve(text, root)
        if path.is_dir():
            found = [(p, f"folder {text}") for p in _children(path) if _is_supported(p)]
        elif str(path).lower().endswith(".csv"):
            try:
                found = read_split_csv(path, root)
            except SplitError as err:
                raise ConfigError(f"{where}: {err}") from err
        elif _MAGIC.search(text):
            found = [(p, f"glob {text}") for p in glob_files(path)]
        elif path.is_file():
            found = [(path, where)]
        else:
            raise ConfigError(f"{where}: {path} is not a file, folder, glob or CSV")
        if not found:
            raise ConfigError(f"{where}: {text} gives no files (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        out.extend(found)
    return out


# ------------------------------------------------------------------------------------------------ reading
def _load_nifti(path: Path) -> tuple[Any, np.ndarray]:
    """The nibabel image and its data as float32 with a trailing singleton 4th axis dropped.

    Raises:
        BadInput: whatever nibabel (or NumPy) raised while reading the file; an exception of our own code is a bug
            and keeps its type (:func:`data.readers.raised_by_format_library`).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # the per-file boundary: nibabel's failure is the file's, anything else a bug
        if not raised_by_format_library(err):
            raise
        raise BadInput(f"{path}: cannot read as NIfTI: {type(err).__name__}: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise BadInput(f"{path}: expected a 2-D image or a 3-D volume, got shape {img.shape}")
    if not np.isfinite(data).all():
        raise BadInput(f"{path}: contains NaN or infinite values")
    return img, data


def _orientation(img: Any, path: Path) -> np.ndarray:
    """``io_orientation`` of the image's affine: [3,2] (voxel axis -> canonical axis, flip).

    Raises:
        BadInput: the affine holds NaN/infinite values, maps an axis to no direction, or nibabel cannot decompose it.
    """
    import nibabel as nib

    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise BadInput(f"{path}: its affine holds NaN or infinite values")
    try:
        ornt = nib.orientations.io_orientation(affine)
    except Exception as err:  # the per-file boundary, as in _load_nifti
        if not raised_by_format_library(err):
            raise
        raise BadInput(f"{path}: its affine gives no orientation: {type(err).__name__}: {err}") from err
    if np.isnan(ornt).any():
        raise BadInput(f"{path}: its affine {affine[:3, :3].tolist()} is degenerate (a voxel axis has no direction)")
    return ornt


def to_slices(data: np.ndarray, ornt: np.ndarray | None) -> np.ndarray:
    """Native 2-D / 3-D data -> [n,H,W] display slices (``ornt`` from ``io_orientation``; None for 2-D)."""
    import nibabel as nib

    if ornt is None:
        return np.flipud(data.reshape(data.shape[:2]).T)[None].copy()
    canonical = nib.orientations.apply_orientation(data, ornt)
    return np.stack([np.flipud(canonical[:, :, k].T) for k in range(canonical.shape[2])])


def from_slices(slices: np.ndarray, shape: tuple[int, ...], ornt: np.ndarray | None) -> np.ndarray:
    """Inverse of :func:`to_slices`: [n,H,W] display slices -> an array of the input's ``shape``."""
    import nibabel as nib

    if ornt is None:
        return np.flipud(slices[0]).T.reshape(shape).copy()
    canonical = np.stack([np.flipud(s).T for s in slices], axis=2)
    back = nib.orientations.ornt_transform(_RAS, ornt)
    return nib.orientations.apply_orientation(canonical, back).reshape(shape).copy()


def _no_brain(image: np.ndarray, brain: np.ndarray | None) -> bool:
    if brain is not None:
        return not brain.any()
    return float(image.max()) <= float(image.min())


def read_scan(path: Path, mask_path: Path | None, *, axial_range: list[int] | None, source: str) -> Scan:
    """Read one input (and its mask) into slices; 3-D volumes keep only slices with brain in ``axial_range``.

    Without a brain mask a constant slice has "no brain". A volume whose selected slices all lack brain, or a
    2-D input without brain, is a bad input.

    Raises:
        BadInput: missing or not a regular file, unsupported type, unreadable (whatever the format library
            raised), not 2-D/3-D, a degenerate affine, mask of another shape, no brain (naming the file).
    """
    for file in (path, mask_path):
        if file is not None and not file.is_file():  # a folder or a FIFO named like a scan: reading could block
            raise BadInput(f"{file}: not found or not a regular file ({source})")
    try:
        kinds = [file_format(f) for f in (path, mask_path) if f is not None]
    except DataReadError as err:
        raise BadInput(f"{err} ({source})") from err
    if kinds[0] != "nifti":
        try:
            image = read_slice(path, source=source)
            brain = None if mask_path is None else read_slice(mask_path, source=source) != 0
        except DataReadError as err:
            raise BadInput(str(err)) from err
        if brain is not None and brain.shape != image.shape:
            raise BadInput(f"{mask_path}: mask shape {brain.shape} differs from {path} shape {image.shape}")
        if _no_brain(image, brain):
            raise BadInput(f"{path}: no brain in the slice ({'empty mask' if brain is not None else 'constant'})")
        return Scan(path=path, mask_path=mask_path, kind="image", slices=image[None], indices=[0], nifti=None,
                    brain=None if brain is None else brain[None], n_axial=1)
    img, data = _load_nifti(path)
    brain_data = None
    if mask_path is not None:
        if kinds[1] != "nifti":
            raise BadInput(f"{mask_path}: the mask of NIfTI input {path} must be a NIfTI file")
        _, brain_data = _load_nifti(mask_path)
        if brain_data.shape != data.shape:
            raise BadInput(f"{mask_path}: mask shape {brain_data.shape} differs from {path} shape {data.shape}")
    flat = data.ndim == 2 or data.shape[2] == 1
    ornt = None if flat else _orientation(img, path)
    slices = to_slices(data, ornt)
    brain = None if brain_data is None else to_slices(brain_data, ornt) != 0
    indices = list(range(slices.shape[0]))
    if not flat and axial_range is not None:
        indices = [k for k in indices if axial_range[0] <= k <= axial_range[1]]
        if not indices:
            raise BadInput(f"{path}: predict.axial_range {axial_range} lies outside its {slices.shape[0]} axial "
                           "slices")
    kept = [k for k in indices if not _no_brain(slices[k], None if brain is None else brain[k])]
    if not kept:
        raise BadInput(f"{path}: no brain in any selected slice"
                       f"{' (empty mask)' if brain is not None else ' (constant slices)'}")
    if len(kept) < len(indices):
        logger.info("%s: %d of %d selected slices have no brain and are not scored (map 0)", path,
                    len(indices) - len(kept), len(indices))
    return Scan(path=path, mask_path=mask_path, kind="nifti", slices=slices[kept], indices=kept, nifti=img,
                brain=None if brain is None else brain[kept], n_axial=slices.shape[0])


def volume_from_slices(scan: Scan, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """[len(scan.indices),H,W] per-slice values -> an array with the input NIfTI's shape (other slices ``fill``)."""
    img = scan.nifti
    shape = tuple(img.shape)
    flat_shape = shape[:3] if len(shape) == 4 else shape
    ornt = None if len(flat_shape) == 2 or flat_shape[2] == 1 else _orientation(img, scan.path)
    full = np.full((scan.n_axial, *values.shape[1:]), fill, dtype=values.dtype)
    full[scan.indices] = values
    return from_slices(full, shape, ornt)


def nifti_like(scan: Scan, data: np.ndarray, dtype: type) -> Any:
    """A NIfTI image holding ``data`` with the input's affine and header (data type ``dtype``)."""
    import nibabel as nib

    header = scan.nifti.header.copy()
    out = nib.Nifti1Image(data.astype(dtype), scan.nifti.affine, header)
    out.set_data_dtype(dtype)
    out.header["scl_slope"], out.header["scl_inter"] = 1.0, 0.0
    return out


def output_stem(path: Path) -> str:
    """``sub-01_T1w.nii.gz`` -> ``sub-01_T1w``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
