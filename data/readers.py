"""Reading one 2-D slice from a file, whatever its format.

Supported formats (chosen by the file name's extension, case-insensitive):

- ``.png``, ``.jpg``, ``.jpeg``: 8-bit (also 16-bit PNG) grey images; RGB/RGBA images are converted to
  grey with PIL's ``L`` conversion (ITU-R 601-2 luma).
- ``.npy``: a 2-D array (a leading or trailing singleton axis is dropped); read without pickle.
- ``.nii``, ``.nii.gz``: NIfTI via nibabel. 2-D images (or 3-D with one slice) are read as they are.
  3-D volumes are reoriented to the closest canonical (RAS+) orientation and the **middle axial slice**
  (middle index of the third, inferior-to-superior axis) is taken. Every slice from NIfTI, 2-D or 3-D, is
  shown in display orientation: anterior at the top, the subject's left on the left (``flipud(slice.T)``).
  The preparation tools (:mod:`data.prepare`) choose slices explicitly and write 2-D ``.npy`` files.
- ``.dcm``: DICOM via pydicom; ``RescaleSlope``/``RescaleIntercept`` are applied; multi-frame files give
  their middle frame.
- ``.h5``, ``.hdf5``: fastMRI HDF5 via h5py; the ``reconstruction_rss`` dataset ``[slices, H, W]`` gives
  its middle slice (a 2-D dataset is read as it is), in the stored orientation (``python -m data.prepare
  fastmri`` flips it up-down, the orientation fastMRI+ boxes refer to).

Every reader returns a finite 2-D float32 array with the file's raw values (no scaling: that is
:mod:`data.preprocess`'s job). Any failure raises :class:`DataReadError` naming the file (and, when the
caller passes it, the CSV and row the file came from). There is never a fallback sample.

Which failures are the file's: the readers' own checks (no pixel data, no fastMRI dataset, not 2-D, NaN) and
*any* exception raised inside a format library (:data:`FORMAT_LIBRARIES`) while it decodes the file, whatever
its type: pydicom reports a missing element as ``AttributeError``, PIL a decompression bomb as its own
``Exception`` subclass, NumPy a bad header as ``ValueError``. An exception raised by this repository's own code
(a ``TypeError`` in a reader, an ``IndexError`` in the slicing) is a bug and keeps its type and traceback
(:func:`raised_by_format_library` tells them apart by the frame that raised).
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

import numpy as np

from dl_utils.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
HDF5_SUFFIXES = (".h5", ".hdf5")
SUPPORTED_SUFFIXES = (*IMAGE_SUFFIXES, ".npy", *NIFTI_SUFFIXES, ".dcm", *HDF5_SUFFIXES)
FASTMRI_KEY = "reconstruction_rss"
# The libraries that decode the files: what they raise while reading one is that file's problem.
FORMAT_LIBRARIES = ("PIL", "numpy", "nibabel", "pydicom", "h5py")
_REPO_ROOT = str(Path(__file__).resolve().parents[1]) + os.sep
_DICOM_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DataReadError(DataError):
    """A file could not be read (missing, unreadable, unsupported or not a 2-D slice)."""


def file_format(path: str | Path) -> str:
    """The format key of ``path``: one of ``image``, ``npy``, ``nifti``, ``dicom``, ``hdf5``.

    Raises:
        DataReadError: for an unsupported extension, listing the supported ones.
    """
    name = str(path).lower()
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".dcm"):
        return "dicom"
    if name.endswith(HDF5_SUFFIXES):
        return "hdf5"
    raise DataReadError(f"{path}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _squeeze_2d(array: np.ndarray, path: Path) -> np.ndarray:
    array = np.asarray(array)
    while array.ndim > 2 and 1 in (array.shape[0], array.shape[-1]):
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2:
        raise DataReadError(f"{path}: expected a 2-D slice, got an array of shape {array.shape}")
    return array


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        if img.mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
            img = img.convert("L")
        return np.asarray(img)


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    img = nib.load(str(path))
    shape = img.shape
    if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape[:2])
        return np.flipud(data.T)
    if len(shape) == 4 and shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise DataReadError(f"{path}: expected a 2-D image or a 3-D volume, got shape {shape}")
    img = nib.as_closest_canonical(img)
    middle = img.shape[2] // 2
    data = np.asarray(img.dataobj[:, :, middle], dtype=np.float32)
    return np.flipud(data.T)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    if not any(keyword in ds for keyword in _DICOM_PIXEL_KEYWORDS):
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "no SOP class"
        raise DataReadError(f"{path}: a DICOM without pixel data ({kind}): not an image")
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 3 and int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[pixels.shape[0] // 2]
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return pixels * slope + intercept


def _read_hdf5(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        if FASTMRI_KEY not in f:
            raise DataReadError(f"{path}: no {FASTMRI_KEY!r} dataset (keys: {', '.join(f.keys()) or 'none'})")
        dset = f[FASTMRI_KEY]
        if not isinstance(dset, h5py.Dataset):
            raise DataReadError(f"{path}: {FASTMRI_KEY!r} is a {type(dset).__name__}, not a dataset")
        if dset.ndim == 3:
            return np.asarray(dset[dset.shape[0] // 2])
        return np.asarray(dset[()])


_READERS = {"image": _read_image, "npy": _read_npy, "nifti": _read_nifti, "dicom": _read_dicom,
            "hdf5": _read_hdf5}


def _frames(tb: types.TracebackType | None) -> list[types.FrameType]:
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _is_ours(filename: str) -> bool:
    """A file of this repository (a virtual environment kept inside it holds libraries, not our code)."""
    return filename.startswith(_REPO_ROOT) and not any(
        f"{os.sep}{folder}{os.sep}" in filename for folder in ("site-packages", "dist-packages"))


def raised_by_format_library(err: BaseException) -> bool:
    """Whether ``err`` came out of a format library (:data:`FORMAT_LIBRARIES`) that this repository called.

    The traceback runs from the frame that caught ``err`` down to the one that raised it; the call that left this
    repository's code last decides: a call into a format library (whatever that library called in turn, e.g.
    ``gzip``) means the library failed on its input, while an exception raised in this repository's own frame, or
    inside any other library, is not a reading failure.
    """
    frames = _frames(err.__traceback__)
    ours = [i for i, frame in enumerate(frames) if _is_ours(frame.f_code.co_filename)]
    if not ours or ours[-1] + 1 >= len(frames):
        return False
    callee = str(frames[ours[-1] + 1].f_globals.get("__name__", ""))
    return callee.split(".")[0] in FORMAT_LIBRARIES


def read_slice(path: str | Path, *, source: str | None = None) -> np.ndarray:
    """Read one 2-D slice.

    Args:
        path: the file (see the module docstring for formats and the slice taken from volumes).
        source: where the path came from (e.g. ``data/splits/x.csv row 3``), added to error messages.

    Returns:
        [H,W] float32 array of the file's raw (unscaled), finite values.

    Raises:
        DataReadError: the file is missing, unreadable, unsupported, not 2-D or holds non-finite values.
    """
    path = Path(path)
    where = f" ({source})" if source else ""
    if not path.is_file():
        raise DataReadError(f"{path}: file not found{where}")
    kind = file_format(path)
    try:
        array = _squeeze_2d(_READERS[kind](path), path)
    except DataReadError as err:
        raise DataReadError(f"{err}{where}") from err
    except Exception as err:  # the per-file boundary: the library's failure is the file's, anything else a bug
        if not raised_by_format_library(err):
            raise
        raise DataReadError(f"{path}: cannot read as {kind}{where}: {type(err).__name__}: {err}") from err
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise DataReadError(f"{path}: contains NaN or infinite values{where}")
    return np.ascontiguousarray(array)
