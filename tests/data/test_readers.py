"""Every file reader: values, the slice chosen from volumes, and the errors naming the file."""

from __future__ import annotations

from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import data.readers as readers
from data.readers import DataReadError, file_format, read_slice


def _ramp(h: int = 6, w: int = 5) -> np.ndarray:
    return np.arange(h * w, dtype=np.float32).reshape(h, w)


def test_png_8bit_grey_and_rgb(tmp_path: Path) -> None:
    grey = (_ramp() * 8).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_slice(tmp_path / "g.png"), grey.astype(np.float32))
    rgb = np.stack([grey] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = read_slice(tmp_path / "c.png")
    assert out.shape == grey.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, grey, atol=1)


def test_png_16bit_keeps_precision(tmp_path: Path) -> None:
    values = (_ramp() * 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_slice(tmp_path / "x.png"), values.astype(np.float32))


def test_jpeg(tmp_path: Path) -> None:
    image = np.full((16, 16), 120, np.uint8)
    Image.fromarray(image).save(tmp_path / "x.JPG", quality=95)
    out = read_slice(tmp_path / "x.JPG")
    assert out.shape == (16, 16)
    np.testing.assert_allclose(out, 120, atol=2)


def test_npy_2d_and_singleton_axes(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", _ramp())
    np.save(tmp_path / "b.npy", _ramp()[None])
    np.save(tmp_path / "c.npy", _ramp()[..., None])
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(read_slice(tmp_path / f"{name}.npy"), _ramp())


def test_npy_volume_is_an_error(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.zeros((3, 4, 5), np.float32))
    with pytest.raises(DataReadError, match=r"v\.npy.*2-D"):
        read_slice(tmp_path / "v.npy", source="split.csv row 1")


def test_nifti_2d_display_orientation(tmp_path: Path) -> None:
    data = _ramp(4, 3)  # [x, y]
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "s.nii.gz")
    np.testing.assert_array_equal(read_slice(tmp_path / "s.nii.gz"), np.flipud(data.T))


def test_nifti_volume_middle_axial_slice_after_canonical(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).random((4, 5, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "v.nii")
    np.testing.assert_allclose(read_slice(tmp_path / "v.nii"), np.flipud(volume[:, :, 3].T), rtol=1e-6)
    # The same anatomy stored with the z axis flipped (LPI-like) must give the same slice.
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = 6.0
    nib.save(nib.Nifti1Image(volume[:, :, ::-1].copy(), flip), tmp_path / "w.nii.gz")
    np.testing.assert_allclose(read_slice(tmp_path / "w.nii.gz"), read_slice(tmp_path / "v.nii"), rtol=1e-6)


def _write_dicom(path: Path, pixels: np.ndarray, slope: float = 2.0, intercept: float = -5.0) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_applies_rescale(tmp_path: Path) -> None:
    pixels = (_ramp() * 3).astype(np.uint16)
    _write_dicom(tmp_path / "x.dcm", pixels)
    np.testing.assert_allclose(read_slice(tmp_path / "x.dcm"), pixels * 2.0 - 5.0)


def test_fastmri_hdf5_middle_slice(tmp_path: Path) -> None:
    volume = np.random.default_rng(1).random((5, 8, 6)).astype(np.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("reconstruction_rss", data=volume)
    np.testing.assert_array_equal(read_slice(tmp_path / "f.h5"), volume[2])


def test_hdf5_without_rss_names_the_file_and_source(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("kspace", data=np.zeros((2, 2)))
    with pytest.raises(DataReadError, match=r"f\.h5.*reconstruction_rss.*split\.csv row 4"):
        read_slice(tmp_path / "f.h5", source="split.csv row 4")


def test_missing_corrupt_unsupported_and_nonfinite(tmp_path: Path) -> None:
    with pytest.raises(DataReadError, match=r"nope\.png: file not found \(a\.csv row 2\)"):
        read_slice(tmp_path / "nope.png", source="a.csv row 2")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataReadError, match=r"bad\.png: cannot read as image \(a\.csv row 3\)"):
        read_slice(tmp_path / "bad.png", source="a.csv row 3")
    (tmp_path / "x.tif").write_bytes(b"")
    with pytest.raises(DataReadError, match="unsupported file type"):
        read_slice(tmp_path / "x.tif")
    np.save(tmp_path / "nan.npy", np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(DataReadError, match="NaN"):
        read_slice(tmp_path / "nan.npy")


def test_dicom_without_pixel_data_or_with_a_missing_element_is_a_read_error(tmp_path: Path) -> None:
    import pydicom

    _write_dicom(tmp_path / "x.dcm", _ramp().astype(np.uint16))
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    del ds.PixelData  # e.g. a structured report: pydicom raised AttributeError deep inside pixel_array
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(DataReadError, match=r"nopixels\.dcm: a DICOM without pixel data \(Secondary Capture Image "
                                            r"Storage\): not an image \(a\.csv row 1\)"):
        read_slice(tmp_path / "nopixels.dcm", source="a.csv row 1")
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    del ds.Rows
    ds.save_as(tmp_path / "norows.dcm")
    with pytest.raises(DataReadError, match=r"norows\.dcm: cannot read as dicom: AttributeError: .*'Rows'"):
        read_slice(tmp_path / "norows.dcm")


def test_any_exception_of_a_format_library_is_a_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels > 2 x 10: PIL's own Exception subclass
    with pytest.raises(DataReadError, match=r"big\.png: cannot read as image: DecompressionBombError"):
        read_slice(tmp_path / "big.png")
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("reconstruction_rss")
    with pytest.raises(DataReadError, match=r"g\.h5: 'reconstruction_rss' is a Group, not a dataset"):
        read_slice(tmp_path / "g.h5")


def test_a_bug_in_our_reader_code_keeps_its_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    np.save(tmp_path / "x.npy", _ramp())
    monkeypatch.setitem(readers._READERS, "npy", lambda path: np.load(path)[0, 0, 0])  # our IndexError
    with pytest.raises(IndexError):
        read_slice(tmp_path / "x.npy")
    monkeypatch.setitem(readers._READERS, "npy", lambda path: json.loads("not json"))  # not a format library
    with pytest.raises(json.JSONDecodeError):
        read_slice(tmp_path / "x.npy")
    monkeypatch.setitem(readers._READERS, "npy", lambda path: np.load(path, mmap_mode="x"))  # numpy's ValueError
    with pytest.raises(DataReadError, match=r"x\.npy: cannot read as npy: ValueError"):
        read_slice(tmp_path / "x.npy")


def test_file_format_keys() -> None:
    assert [file_format(p) for p in ("a.PNG", "b.jpeg", "c.npy", "d.nii.gz", "e.nii", "f.dcm", "g.h5")] == [
        "image", "image", "npy", "nifti", "nifti", "dicom", "hdf5"]
