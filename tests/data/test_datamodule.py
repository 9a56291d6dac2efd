"""core.data_module.DataModule: split specs, sources, loaders, the no-augmentation-at-eval rule, errors.

(Lives with the data tests: the data engineer owns tests/data/.)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from core.Configurator import ConfigError, build
from core.data_module import REPO_ROOT, DataModule, DatasetInfo
from data.batch import Batch
from data.dataset import SplitError
from data.readers import DataReadError
from tests.data.conftest import write_csv

GAMMA = {"module_name": "data.transforms", "class_name": "RandomGamma", "params": {"gamma": [0.5, 0.5], "p": 1.0}}


def _module(split: dict[str, Path], **params) -> DataModule:  # noqa: ANN003
    spec = {"images": [str(split["images"])], "masks": [str(split["masks"])]}
    test = {"lesions": {"images": [str(split["images"])], "labels": [str(split["labels"])],
                        "masks": [str(split["masks"])]}}
    params = {"target_size": [16, 16], "batch_size": 2, "eval_batch_size": 3, "train": spec, "val": spec,
              "test": test, **params}
    return build({"module_name": "core.data_module", "class_name": "DataModule", "params": params}, "data",
                 base=DataModule)


def _all(loader) -> Batch:  # noqa: ANN001
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    return Batch(image=torch.cat([b.image for b in batches]),
                 anomaly_mask=None if batches[0].anomaly_mask is None else torch.cat([b.anomaly_mask for b in batches]),
                 brain_mask=None if batches[0].brain_mask is None else torch.cat([b.brain_mask for b in batches]),
                 label=torch.cat([b.label for b in batches]), path=[p for b in batches for p in b.path])


def test_csv_splits_yield_batches(make_split) -> None:  # noqa: ANN001
    data = _module(make_split(n=5))
    train = _all(data.train_dataloader())
    assert train.image.shape == (5, 1, 16, 16) and train.anomaly_mask is None
    assert train.brain_mask is not None and train.label.tolist() == [0] * 5
    test = _all(data.eval_dataloader("lesions"))
    assert test.label.tolist() == [1] * 5
    assert set(test.anomaly_mask.unique().tolist()) == {0.0, 1.0}
    assert [Path(p).name for p in test.path] == [f"img{i}.npy" for i in range(5)]  # not shuffled
    assert 0.0 <= float(test.image.min()) and float(test.image.max()) <= 1.0
    assert data.test_set_names == ["lesions"]
    assert data.dataset_info("lesions") == DatasetInfo(name="lesions", pathological=True, has_anomaly_mask=True,
                                                       has_brain_mask=True, annotation="pixel", size=5,
                                                       has_subjects=False)
    assert data.dataset_info("train").pathological is False
    files = data.split_files()
    assert {p.name for p in files} == {"images.csv", "masks.csv", "labels.csv"} and all(p.is_absolute() for p in files)


def test_glob_source_and_max_samples(make_split) -> None:  # noqa: ANN001
    split = make_split(n=4)
    data = _module(split, train={"glob": str(split["folder"] / "img*.npy"), "max_samples": 3})
    batch = _all(data.eval_dataloader("train"))
    assert [Path(p).name for p in batch.path] == ["img0.npy", "img1.npy", "img2.npy"]


def test_relative_paths_resolve_against_the_repo_root(make_split, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    split = make_split(n=2)
    relative_images = [os.path.relpath(p, REPO_ROOT) for p in sorted(split["folder"].glob("img*.npy"))]
    csv_path = write_csv(split["folder"] / "relative.csv", relative_images)
    monkeypatch.chdir(split["folder"])  # the working directory must not matter
    data = _module(split, train={"images": [os.path.relpath(csv_path, REPO_ROOT)]})
    assert len(_all(data.eval_dataloader("train")).image) == 2


def test_no_augmentation_outside_training(make_split) -> None:  # noqa: ANN001
    data = _module(make_split(n=4), augmentation=[GAMMA])
    plain = _all(data.eval_dataloader("train"))
    order = np.argsort(np.array(plain.path))
    train = _all(data.train_dataloader(seed=0))
    by_path = dict(zip(train.path, train.image, strict=True))
    for i in order:
        torch.testing.assert_close(by_path[plain.path[i]], plain.image[i].sqrt())  # gamma 0.5 applied in training
    for loader in (data.val_dataloader(), data.eval_dataloader("val"), data.eval_dataloader("lesions")):
        batch = _all(loader)
        torch.testing.assert_close(batch.image, plain.image)  # identical to the un-augmented slices


def test_training_shuffle_is_seeded(make_split) -> None:  # noqa: ANN001
    data = _module(make_split(n=8))
    order = [list(_all(data.train_dataloader(seed=s)).path) for s in (0, 0, 1)]
    assert order[0] == order[1] and order[0] != order[2]
    assert sorted(order[0]) == sorted(order[2])


def test_distributed_training_partitions_the_set(make_split) -> None:  # noqa: ANN001
    data = _module(make_split(n=6))
    loaders = [data.train_dataloader(rank=r, world_size=2, seed=3) for r in range(2)]
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)
    paths = [set(_all(loader).path) for loader in loaders]
    assert len(paths[0]) == len(paths[1]) == 3 and not paths[0] & paths[1]
    with pytest.raises(ValueError, match="rank"):
        data.train_dataloader(rank=2, world_size=2)


def test_drop_last_only_when_asked(make_split) -> None:  # noqa: ANN001
    split = make_split(n=5)
    assert len(_module(split).train_dataloader()) == 3
    assert len(_module(split, drop_last=True).train_dataloader()) == 2


def test_val_is_optional_and_unknown_names_list_valid_ones(make_split) -> None:  # noqa: ANN001
    data = _module(make_split(n=2), val=None)
    assert data.val_dataloader() is None
    with pytest.raises(KeyError, match="valid names: train, lesions"):
        data.eval_dataloader("nope")


@pytest.mark.parametrize(("params", "message"), [
    ({"train": {"images": ["a.csv"], "lables": ["b.csv"]}}, r"train\.lables: unknown key; valid keys: images"),
    ({"train": {"images": ["a.csv"], "glob": "*.png"}}, "exactly one of 'images'"),
    ({"train": {"images": ["a.csv"], "labels": ["b.csv"], "annotation": "polygon"}}, "'polygon' is not one of"),
    ({"train": {"images": ["a.csv"], "annotation": "box"}}, "has no 'labels'"),
    ({"train": {"images": ["a.csv"], "max_samples": 0}}, "max_samples"),
    ({"train": {"images": ["a.csv"]}, "test": {"val": {"images": ["a.csv"]}}}, "reserved"),
    ({"train": {"images": ["a.csv"]}, "intensity": "zscore"}, "zscore"),
    ({"train": {"images": ["a.csv"]}, "cache": "ram"}, "ram"),
    ({"train": {"images": ["a.csv"]}, "augmentation": [{"module_name": "data.transforms", "class_name": "Nope"}]},
     r"augmentation\[0\]\.class_name"),
    ({}, "train"),
])
def test_config_errors_name_the_key(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build({"module_name": "core.data_module", "class_name": "DataModule", "params": params}, "data",
              base=DataModule)


def test_construction_reads_nothing() -> None:
    # --dry-run builds the data module without data on disk; errors come on first use.
    data = DataModule(train={"images": ["does/not/exist.csv"]})
    with pytest.raises(SplitError, match="split CSV not found"):
        data.train_dataloader()


def test_row_misalignment_and_unreadable_files_are_errors(make_split) -> None:  # noqa: ANN001
    split = make_split(n=3)
    short = write_csv(split["folder"] / "short.csv", split["labels"].read_text().splitlines()[1:3])
    data = _module(split, test={"t": {"images": [str(split["images"])], "labels": [str(short)]}})
    with pytest.raises(SplitError, match="3 image rows but 2 labels rows"):
        data.eval_dataloader("t")
    (split["folder"] / "img1.npy").write_bytes(b"garbage")
    with pytest.raises(DataReadError, match=r"img1\.npy: cannot read as npy \(.*images\.csv row 2\)"):
        _module(split).train_dataloader()


def test_empty_glob_is_an_error(make_split) -> None:  # noqa: ANN001
    split = make_split(n=1)
    data = _module(split, train={"glob": str(split["folder"] / "*.nothing")})
    with pytest.raises(SplitError, match="'train' is empty"):
        data.train_dataloader()


def _with_subjects(csv_path: Path, subjects: list[str], out: Path) -> Path:
    rows = csv_path.read_text().splitlines()[1:]
    out.write_text("filename,subject\n" + "".join(f"{r},{s}\n" for r, s in zip(rows, subjects, strict=True)))
    return out


def test_subject_column_reaches_the_batch_and_defaults_to_the_image(make_split) -> None:  # noqa: ANN001
    split = make_split(n=5)
    folder = split["folder"]
    with_subjects = _with_subjects(split["images"], ["a", "a", "b", "b", "b"], folder / "subjects.csv")
    data = _module(split, test={"lesions": {"images": [str(with_subjects)], "labels": [str(split["labels"])]}},
                   val=None)
    batches = list(data.eval_dataloader("lesions"))
    assert [s for b in batches for s in b.subject] == ["a", "a", "b", "b", "b"]
    assert data.dataset_info("lesions").has_subjects and not data.dataset_info("train").has_subjects
    # Without the column each image is its own subject (its path).
    train = list(data.eval_dataloader("train"))
    assert [s for b in train for s in b.subject] == [p for b in train for p in b.path]
    data.split_files()  # train names no subjects: nothing shared


def test_splits_sharing_a_subject_are_an_error(make_split) -> None:  # noqa: ANN001
    split = make_split(n=4)
    folder = split["folder"]
    train = _with_subjects(split["images"], ["s1", "s1", "s2", "s2"], folder / "train.csv")
    test = _with_subjects(split["images"], ["s3", "s3", "s2", "s4"], folder / "test.csv")
    data = _module(split, train={"images": [str(train)]}, val=None,
                   test={"lesions": {"images": [str(test)], "labels": [str(split["labels"])]}})
    with pytest.raises(SplitError, match=r"'train' and 'lesions' share 1 subject\(s\), e.g. s2"):
        data.split_files()
    (folder / "bad.csv").write_text(f"filename,subject\n{folder / 'img0.npy'},\n")
    bad = _module(split, train={"images": [str(folder / "bad.csv")]}, val=None, test={})
    with pytest.raises(SplitError, match=r"bad\.csv row 1: empty 'subject'"):
        bad.dataset_info("train")
