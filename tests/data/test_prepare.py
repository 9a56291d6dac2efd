"""Each preparation CLI on tiny files written in the dataset's native layout."""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from core.data_module import DataModule
from data.prepare import PrepareError, foreground_mask, main, normalise_label


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _head(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A bright ellipsoid 'head' on a zero background, with a little texture."""
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < 0.6
    return (inside * (100 + 10 * rng.random(shape))).astype(np.float32)


def _nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


def test_ixi(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    volumes = {}
    for i in range(3):
        volumes[i] = _head((20, 24, 16), rng)
        _nifti(tmp_path / "src" / f"IXI00{i}-Guys-000{i}-T1.nii.gz", volumes[i])
    out = tmp_path / "out"
    assert main(["ixi", "--src", str(tmp_path / "src"), "--out", str(out), "--n-slices", "3",
                 "--test-fraction", "0.34"]) == 0
    train, test = _rows(out / "splits" / "ixi_train.csv"), _rows(out / "splits" / "ixi_test.csv")
    assert len(train) == 6 and len(test) == 3  # 2 + 1 subjects, 3 slices each, subjects never split
    assert len({r["subject"] for r in test} & {r["subject"] for r in train}) == 0
    assert sorted({int(r["slice"]) for r in train}) == [7, 8, 9]
    first = next(r for r in train + test if r["subject"] == "IXI000" and r["slice"] == "8")
    np.testing.assert_array_equal(np.load(first["filename"]), np.flipud(volumes[0][:, :, 8].T))
    masks = _rows(out / "splits" / "ixi_train_mask.csv")
    assert len(masks) == 6 and np.load(masks[0]["filename"]).dtype == np.uint8
    assert "train: 6" in capsys.readouterr().out


def _fastmri_layout(tmp_path: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    src = tmp_path / "fastmri"
    src.mkdir()
    for stem in ("file_brain_AXT1_a", "file_brain_AXT1_b", "file_brain_AXT1_c", "file_brain_AXT1_d"):
        volume = np.stack([_head((32, 32), rng) for _ in range(5)])
        volume[2, 4:8, 20:26] = 400.0  # a bright spot, stored rows 4-7, columns 20-25, on the middle slice
        with h5py.File(src / f"{stem}.h5", "w") as f:
            f.create_dataset("reconstruction_rss", data=volume)
            f.create_dataset("kspace", data=np.zeros((1, 2, 2), np.complex64))
    # fastMRI+ boxes count y from the bottom of the stored array: the spot's box is y = 32 - 8 = 24.
    annotations = tmp_path / "brain.csv"
    annotations.write_text(
        "file,slice,study_level,x,y,width,height,label\n"
        "file_brain_AXT1_a,2,No,20,24,6,4,Nonspecific lesion\n"
        "file_brain_AXT1_a,2,No,5,10,4,4,Edema\n"
        "file_brain_AXT1_a,1,No,5,10,4,4,Edema\n"  # another slice: not the middle one, ignored
        "file_brain_AXT1_a,2,No,2,2,3,3,Extra-axial mass\n"
        "file_brain_AXT1_b,,Yes,,,,,Normal for age\n"
        "file_brain_AXT1_d,0,No,1,1,2,2,Edema\n"  # annotated elsewhere only: neither box row nor healthy
    )
    return src, annotations


def test_fastmri_boxes_study_level_and_healthy(tmp_path: Path) -> None:
    src, annotations = _fastmri_layout(tmp_path)
    out = tmp_path / "out"
    assert main(["fastmri", "--src", str(src), "--out", str(out), "--annotations", str(annotations),
                 "--val-fraction", "0", "--test-fraction", "0"]) == 0
    splits = out / "splits"
    lesion, lesion_label, lesion_mask = (_rows(splits / f"nonspecific_lesion{s}.csv") for s in ("", "_label", "_mask"))
    assert len(lesion) == len(lesion_label) == len(lesion_mask) == 1
    image, box, tissue = (np.load(r[0]["filename"]) for r in (lesion, lesion_label, lesion_mask))
    # Stored flipped up-down (fastMRI+ orientation): the spot now sits in rows 24-27 and the box covers it exactly.
    assert box.sum() == 24 and box[24:28, 20:26].all()
    assert image[box == 1].min() == 400.0
    assert not (tissue & box).any() and tissue.sum() > 0
    # One row per annotation, grouped by class; the extra-axial mass is merged into "mass".
    assert len(_rows(splits / "edema.csv")) == 1 and len(_rows(splits / "mass.csv")) == 1
    edema_tissue = np.load(_rows(splits / "edema_mask.csv")[0]["filename"])
    np.testing.assert_array_equal(edema_tissue, tissue)  # healthy tissue excludes every box of the slice
    study = _rows(splits / "study_level.csv")
    assert [(Path(r["filename"]).name, r["label"]) for r in study] == [("file_brain_AXT1_b_s02.npy", "normal_for_age")]
    healthy = _rows(splits / "healthy_train.csv")
    assert [Path(r["filename"]).name for r in healthy] == ["file_brain_AXT1_c_s02.npy"]
    # The class triple loads through the data module as a box-annotated pathological set.
    data = DataModule(target_size=(16, 16), train={"images": [str(splits / "healthy_train.csv")]},
                      test={"nonspecific_lesion": {"images": [str(splits / "nonspecific_lesion.csv")],
                                                   "labels": [str(splits / "nonspecific_lesion_label.csv")],
                                                   "masks": [str(splits / "nonspecific_lesion_mask.csv")],
                                                   "annotation": "box"}})
    batch = next(iter(data.eval_dataloader("nonspecific_lesion")))
    assert batch.anomaly_mask.sum() > 0 and (batch.healthy_tissue * batch.anomaly_mask).sum() == 0


def test_fastmri_several_slices_per_file(tmp_path: Path) -> None:
    src, annotations = _fastmri_layout(tmp_path)
    out = tmp_path / "out"
    assert main(["fastmri", "--src", str(src), "--out", str(out), "--annotations", str(annotations),
                 "--val-fraction", "0", "--test-fraction", "0", "--n-slices", "3"]) == 0
    splits = out / "splits"
    healthy = _rows(splits / "healthy_train.csv")
    assert [(r["subject"], r["slice"]) for r in healthy] == [("file_brain_AXT1_c", k) for k in ("1", "2", "3")]
    # Slice 1 of file a now carries its own edema box (annotation row 3); slice 3 has none and is left out.
    edema = _rows(splits / "edema.csv")
    assert [(r["subject"], r["slice"], r["annotation_row"]) for r in edema] == [
        ("file_brain_AXT1_a", "1", "3"), ("file_brain_AXT1_a", "2", "2")]
    assert len(_rows(splits / "study_level.csv")) == 3  # one study-level row per chosen slice of file b
    with pytest.raises(PrepareError, match="leave the volume's 5 slices"):
        main(["fastmri", "--src", str(src), "--out", str(tmp_path / "o"), "--annotations", str(annotations),
              "--n-slices", "7"])


def test_splits_never_share_a_subject(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    src = tmp_path / "fastmri"
    src.mkdir()
    for i in range(9):
        with h5py.File(src / f"file_brain_AXT1_{i}.h5", "w") as f:
            f.create_dataset("reconstruction_rss", data=np.stack([_head((16, 16), rng) for _ in range(4)]))
        _nifti(tmp_path / "ixi" / f"IXI00{i}-HH-000{i}-T1.nii.gz", _head((12, 12, 8), rng))
    annotations = tmp_path / "brain.csv"
    annotations.write_text("file,slice,study_level,x,y,width,height,label\n")
    for tool, extra in (("fastmri", ["--src", str(src), "--annotations", str(annotations)]),
                        ("ixi", ["--src", str(tmp_path / "ixi")])):
        out = tmp_path / f"out_{tool}"
        assert main([tool, *extra, "--out", str(out), "--n-slices", "2", "--val-fraction", "0.34",
                     "--test-fraction", "0.34", "--seed", "1"]) == 0
        subjects = {split: [r["subject"] for r in _rows(csv_path)]
                    for split in ("train", "val", "test")
                    for csv_path in out.glob(f"splits/*{split}.csv")}
        assert all(len(s) == 6 for s in subjects.values())  # 3 subjects x 2 slices in every split
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            assert not set(subjects[a]) & set(subjects[b]), (tool, a, b)


def test_fastmri_box_outside_the_slice_is_an_error(tmp_path: Path) -> None:
    src, annotations = _fastmri_layout(tmp_path)
    annotations.write_text("file,slice,study_level,x,y,width,height,label\nfile_brain_AXT1_a,2,No,50,50,4,4,Edema\n")
    with pytest.raises(PrepareError, match=r"brain\.csv row 1 .*outside"):
        main(["fastmri", "--src", str(src), "--out", str(tmp_path / "o"), "--annotations", str(annotations)])


def test_atlas_bids(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    anat = tmp_path / "ATLAS" / "R001" / "sub-r001s001" / "ses-1" / "anat"
    prefix = "sub-r001s001_ses-1_space-MNI152NLin2009aSym"
    volume = _head((20, 24, 12), rng)
    lesion = np.zeros(volume.shape, np.uint8)
    lesion[8:12, 10:13, 6] = 1
    _nifti(anat / f"{prefix}_T1w.nii.gz", volume)
    _nifti(anat / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz", lesion)
    out = tmp_path / "out"
    assert main(["atlas", "--src", str(tmp_path / "ATLAS"), "--out", str(out), "--slice", "6"]) == 0
    rows, labels = _rows(out / "splits" / "atlas.csv"), _rows(out / "splits" / "atlas_label.csv")
    assert len(rows) == len(labels) == len(_rows(out / "splits" / "atlas_mask.csv")) == 1
    assert rows[0]["subject"] == "sub-r001s001" and rows[0]["lesion_px"] == "12"
    np.testing.assert_array_equal(np.load(labels[0]["filename"]), np.flipud(lesion[:, :, 6].T))
    (anat / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz").unlink()
    with pytest.raises(PrepareError, match="lesion mask .* not found"):
        main(["atlas", "--src", str(tmp_path / "ATLAS"), "--out", str(out)])


def test_brats_binarises_tumour_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    case = tmp_path / "BraTS" / "BraTS2021_00001"
    volume = _head((16, 16, 10), rng)
    seg = np.zeros(volume.shape, np.uint8)
    seg[4:6, 4:6, 7], seg[6:8, 4:6, 7], seg[6, 6, 3] = 1, 4, 2
    for modality in ("t1", "t2", "flair"):
        _nifti(case / f"BraTS2021_00001_{modality}.nii.gz", volume * (1 + len(modality)))
    _nifti(case / "BraTS2021_00001_seg.nii.gz", seg)
    out = tmp_path / "out"
    assert main(["brats", "--src", str(tmp_path / "BraTS"), "--out", str(out), "--modality", "flair",
                 "--slice", "max-tumour"]) == 0
    rows = _rows(out / "splits" / "brats.csv")
    assert rows[0]["slice"] == "7" and rows[0]["lesion_px"] == "8" and rows[0]["subject"] == "BraTS2021_00001"
    label = np.load(_rows(out / "splits" / "brats_label.csv")[0]["filename"])
    assert set(np.unique(label)) == {0, 1}
    np.testing.assert_allclose(np.load(rows[0]["filename"]), np.flipud(volume[:, :, 7].T) * 6)


def test_errors_and_helpers(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="is not a folder"):
        main(["ixi", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepareError, match="no files matching"):
        main(["brats", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert normalise_label(" Nonspecific white-matter Lesion ") == "nonspecific_white_matter_lesion"
    image = np.zeros((10, 10), np.float32)
    image[2:8, 2:8] = 50.0
    image[4, 4] = 0.0  # a dark hole inside is filled
    image[0, 9] = 60.0  # an isolated speck is dropped
    mask = foreground_mask(image)
    assert mask[2:8, 2:8].all() and mask.sum() == 36
