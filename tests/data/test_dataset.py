"""Split CSVs -> records -> cached slices: error cases and the three cache modes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import data.dataset as dataset_module
from data.dataset import (
    Record,
    SliceStore,
    SplitError,
    build_records,
    load_record,
    read_split_csv,
)
from data.readers import DataReadError
from tests.data.conftest import write_csv


def _store(split: dict[str, Path], cache: str, tmp_path: Path, **kw) -> SliceStore:  # noqa: ANN003
    images = read_split_csv(split["images"], tmp_path)
    labels = read_split_csv(split["labels"], tmp_path)
    records = build_records(images=images, labels=labels, masks=None, name="t")
    return SliceStore(name="t", records=records, label=1, target_size=(16, 16), intensity="minmax", cache=cache,
                      cache_dir=tmp_path / "cache", split_files=[split["images"], split["labels"]], **kw)


def test_read_split_csv_resolves_relative_names(tmp_path: Path) -> None:
    csv_path = write_csv(tmp_path / "a.csv", ["sub/x.npy", "/abs/y.npy"])
    rows = read_split_csv(csv_path, tmp_path)
    assert rows == [(tmp_path / "sub/x.npy", f"{csv_path} row 1"), (Path("/abs/y.npy"), f"{csv_path} row 2")]


def test_read_split_csv_errors(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="split CSV not found"):
        read_split_csv(tmp_path / "none.csv", tmp_path)
    (tmp_path / "b.csv").write_text("path\nx.npy\n")
    with pytest.raises(SplitError, match="'filename' column"):
        read_split_csv(tmp_path / "b.csv", tmp_path)
    (tmp_path / "c.csv").write_text("filename\nx.npy\n\"\"\n")
    with pytest.raises(SplitError, match=r"c\.csv row 2: empty"):
        read_split_csv(tmp_path / "c.csv", tmp_path)


def test_build_records_errors(make_split, tmp_path: Path) -> None:  # noqa: ANN001
    split = make_split(n=3)
    images = read_split_csv(split["images"], tmp_path)
    labels = read_split_csv(split["labels"], tmp_path)
    with pytest.raises(SplitError, match="3 image rows but 2 labels rows"):
        build_records(images=images, labels=labels[:2], masks=None, name="t")
    with pytest.raises(SplitError, match="'t' is empty"):
        build_records(images=[], labels=None, masks=None, name="t")
    (split["folder"] / "img1.npy").unlink()
    with pytest.raises(SplitError, match=r"file not found: .*img1\.npy \(.*images\.csv row 2\)"):
        build_records(images=images, labels=labels, masks=None, name="t")


def test_mask_shape_must_match_image(tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.zeros((8, 8), np.float32))
    np.save(tmp_path / "m.npy", np.zeros((8, 6), np.uint8))
    record = Record(image=tmp_path / "i.npy", anomaly_mask=tmp_path / "m.npy", brain_mask=None, source="x.csv row 7")
    with pytest.raises(DataReadError, match=r"m\.npy: mask shape \(8, 6\) differs .* \(x\.csv row 7\)"):
        load_record(record, target_size=(4, 4), intensity="minmax")


def test_unit_rule_error_names_file_and_row(tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.full((4, 4), 3.0, np.float32))
    record = Record(image=tmp_path / "i.npy", anomaly_mask=None, brain_mask=None, source="x.csv row 2")
    with pytest.raises(DataReadError, match=r"i\.npy: .*\[0,1\].*x\.csv row 2"):
        load_record(record, target_size=(4, 4), intensity="unit")


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    calls: list[Path] = []
    real = dataset_module.read_slice

    def counting(path, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(Path(path))
        return real(path, **kw)

    monkeypatch.setattr(dataset_module, "read_slice", counting)
    return calls


def test_memory_cache_decodes_once(make_split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    calls = _count_reads(monkeypatch)
    store = _store(make_split(n=3), "memory", tmp_path)
    first = [store[i] for i in range(3)]
    second = [store[i] for i in range(3)]
    assert len(calls) == 6  # 3 images + 3 labels, decoded once
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, second, strict=True))
    assert first[0].image.shape == (1, 16, 16) and first[0].label == 1
    assert set(first[0].anomaly_mask.unique().tolist()) == {0.0, 1.0}
    assert first[0].brain_mask is None


def test_disk_cache_is_reused_and_keyed_by_content(make_split, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    split = make_split(n=3)
    calls = _count_reads(monkeypatch)
    a = _store(split, "disk", tmp_path)
    a.materialize()
    assert len(calls) == 6
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 1 and (folders[0] / "image.npy").is_file()
    b = _store(split, "disk", tmp_path)  # a new process / run: the cache on disk is used
    sample = b[2]
    assert len(calls) == 6
    assert np.array_equal(sample.image, a[2].image)
    # A rewritten image file (new modification time) or an edited CSV gives a new key.
    first_key = a.cache_key()
    os.utime(split["folder"] / "img0.npy", ns=(1_000_000_000, 1_000_000_000))
    second_key = _store(split, "disk", tmp_path).cache_key()
    split["images"].write_text(split["images"].read_text().replace("img2", "img1"))
    third_key = _store(split, "disk", tmp_path).cache_key()
    assert len({first_key, second_key, third_key}) == 3


def test_no_cache_decodes_every_time(make_split, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    calls = _count_reads(monkeypatch)
    store = _store(make_split(n=2), "none", tmp_path)
    store[0]
    store[0]
    assert len(calls) == 4


def test_invalid_cache_mode(make_split, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="cache 'ram' is not one of memory, disk, none"):
        _store(make_split(n=1), "ram", tmp_path)
