"""The embedded benchmark: same seed -> same bytes, sound masks, CSVs, grid CLI, and use via the data config."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from core.Configurator import build, load_config
from core.data_module import REPO_ROOT, DataModule
from data.embedded import CHANGE, CLASSES, EmbeddedBenchmark, main, render, render_subject, size_bin

TINY = {"seed": 3, "n_train": 2, "n_val": 1, "n_test": 1, "n_per_class": 3, "size": 32}
Z_BAND = (76.0, 98.0)  # the default
DEFORMATIONS = ("mass_effect", "enlarged_ventricles")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embedded") / "a"
    return EmbeddedBenchmark(root=str(root), **TINY).prepare()


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes().replace(str(root).encode(), b"<root>")
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes_other_seed_differs(built: Path, tmp_path: Path) -> None:
    again = EmbeddedBenchmark(root=str(tmp_path / "b"), workers=2, **TINY).prepare()  # workers do not matter
    assert _files(built) == _files(again)
    other = EmbeddedBenchmark(root=str(tmp_path / "c"), **{**TINY, "seed": 4}).prepare()
    images = [p.relative_to(built) for p in built.rglob("images/*/*.npy")]
    assert any((built / p).read_bytes() != (other / p).read_bytes() for p in images)


def test_layout_images_and_masks(built: Path) -> None:
    splits = built / "splits"
    for name in ("healthy_train", "healthy_val", "healthy_test"):
        assert len(_rows(splits / f"{name}.csv")) == TINY[f"n_{name.split('_')[1]}"]
        assert len(_rows(splits / f"{name}_mask.csv")) == len(_rows(splits / f"{name}.csv"))
    for cls in CLASSES:
        tables = [_rows(splits / f"{cls}{s}.csv") for s in ("", "_label", "_mask", "_brain")]
        assert [len(t) for t in tables] == [TINY["n_per_class"]] * 4
        for row, label, mask, brain_row in zip(*tables, strict=True):
            image, anomaly, tissue, brain = (np.load(r["filename"]) for r in (row, label, mask, brain_row))
            assert image.shape == (32, 32) and image.dtype == np.float32
            assert 0.0 <= image.min() and image.max() <= 1.0
            assert anomaly.dtype == tissue.dtype == brain.dtype == np.uint8
            assert set(np.unique(anomaly)) <= {0, 1} and set(np.unique(tissue)) <= {0, 1}
            assert int(row["lesion_px"]) == int(anomaly.sum()) > 0, cls
            assert row["size_bin"] == size_bin(int(anomaly.sum()), 32)
            assert not (anomaly & (1 - brain)).any()  # lesions lie inside the brain
            assert not (tissue & (anomaly | (1 - brain))).any()  # healthy tissue: brain, not anomaly
            assert tissue.sum() > 0.2 * brain.sum()
    assert "Louis Collins" in (built / "NOTICE").read_text()


def _check_masks_against_change(cls: str, image: np.ndarray, source: np.ndarray, anomaly: np.ndarray,
                                tissue: np.ndarray, brain: np.ndarray) -> int:
    """Assert the mask definition; return the number of changed brain pixels outside the anomaly mask."""
    changed = np.abs(image.astype(np.float64) - source) > CHANGE
    assert changed.any(), cls  # the pathology changes the image
    assert not (changed & (tissue == 1)).any(), cls  # no changed pixel counts as healthy tissue
    outside = int((changed & (brain == 1) & (anomaly == 0)).sum())
    if cls not in DEFORMATIONS:
        assert outside == 0, cls  # the anomaly mask covers the lesion and its rim
    return outside


@pytest.mark.parametrize("cls", CLASSES)
def test_stored_masks_cover_the_actual_change(built: Path, cls: str) -> None:
    # Re-render each stored pathological slice with its healthy source (same subject, same noise draw) and
    # compare the stored images, not the generator's internals.
    tables = [_rows(built / "splits" / f"{cls}{s}.csv") for s in ("", "_label", "_mask", "_brain")]
    for i, (row, label, mask, brain) in enumerate(zip(*tables, strict=True)):
        rendered = render(TINY["seed"], TINY["size"], Z_BAND, cls, i)
        image = np.load(row["filename"])
        assert rendered.source is not None and np.array_equal(rendered.image, image)
        _check_masks_against_change(cls, image, rendered.source, np.load(label["filename"]),
                                    np.load(mask["filename"]), np.load(brain["filename"]))


@pytest.mark.parametrize("cls", CLASSES)
def test_masks_cover_the_actual_change_at_128(cls: str) -> None:
    for i in range(3):  # one image per size bin
        out = render(0, 128, Z_BAND, cls, i)
        assert out.source is not None and out.anomaly is not None and out.healthy_tissue is not None
        outside = _check_masks_against_change(cls, out.image, out.source, out.anomaly, out.healthy_tissue, out.brain)
        # A deformation moves tissue well beyond the anomaly: the healthy-tissue mask is what excludes it.
        assert (outside > 20) == (cls in DEFORMATIONS), (cls, outside)


MULTI = {**TINY, "n_train": 1, "n_per_class": 2, "slices_per_subject": 3}


@pytest.fixture(scope="module")
def built_multi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return EmbeddedBenchmark(root=str(tmp_path_factory.mktemp("embedded") / "m"), **MULTI).prepare()


def test_subjects_with_several_slices(built_multi: Path) -> None:
    splits = built_multi / "splits"
    for name in ("healthy_train", "healthy_val", "healthy_test", *CLASSES):
        rows = _rows(splits / f"{name}.csv")
        n = MULTI["n_per_class"] if name in CLASSES else MULTI[f"n_{name.split('_')[1]}"]
        assert [(r["subject"], r["slice"]) for r in rows] == [(f"{name}-{s:05d}", str(j)) for s in range(n)
                                                                for j in range(3)]
    # Every slice of a pathological subject shows its lesion, and the masks cover each slice's actual change.
    for cls in CLASSES:
        tables = [_rows(splits / f"{cls}{s}.csv") for s in ("", "_label", "_mask", "_brain")]
        for s in range(MULTI["n_per_class"]):
            rendered = render_subject(MULTI["seed"], MULTI["size"], Z_BAND, cls, s, slices=3)
            for j, (row, label, mask, brain) in enumerate(list(zip(*tables, strict=True))[3 * s:3 * s + 3]):
                image, anomaly = np.load(row["filename"]), np.load(label["filename"])
                assert np.array_equal(rendered[j].image, image) and int(row["lesion_px"]) == anomaly.sum() > 0
                _check_masks_against_change(cls, image, rendered[j].source, anomaly, np.load(mask["filename"]),
                                            np.load(brain["filename"]))


def test_a_subjects_slices_are_one_volume() -> None:
    for cls in ("healthy_test", "hypointense_lesion"):
        slices = render_subject(0, 64, Z_BAND, cls, 1, slices=3)
        # The anchor (middle) slice is the single-slice benchmark's image of the same subject index.
        assert np.array_equal(slices[1].image, render(0, 64, Z_BAND, cls, 1).image)
        others = render_subject(0, 64, Z_BAND, cls, 2, slices=3)
        brain = [s.brain.astype(bool) for s in slices]

        def iou(a: np.ndarray, b: np.ndarray) -> float:
            return (a & b).sum() / (a | b).sum()

        # Neighbouring slices differ (own level and noise) but share the subject's geometry far more than two
        # subjects do.
        assert not np.array_equal(slices[0].image, slices[1].image)
        assert min(iou(brain[0], brain[1]), iou(brain[2], brain[1])) > iou(brain[1], others[1].brain.astype(bool))
    # The lesion is one 3-D object: it sits at the same place on every slice.
    lesion = [s.anomaly.astype(bool) for s in slices]
    assert min(iou(lesion[0], lesion[1]), iou(lesion[2], lesion[1])) > 0.5


def test_pathology_is_visible_against_healthy_tissue(built: Path) -> None:
    rows = _rows(built / "splits" / "hypointense_lesion.csv")
    labels = _rows(built / "splits" / "hypointense_lesion_label.csv")
    masks = _rows(built / "splits" / "hypointense_lesion_mask.csv")
    contrasts = []
    for row, label, mask in zip(rows, labels, masks, strict=True):
        image, lesion, brain = np.load(row["filename"]), np.load(label["filename"]), np.load(mask["filename"])
        healthy = (brain == 1) & (lesion == 0)
        contrasts.append(np.median(image[healthy]) - image[lesion == 1].mean())
    assert min(contrasts) > 0.1


def test_prepare_is_idempotent_and_refuses_foreign_folders(built: Path, tmp_path: Path) -> None:
    stamp = (built / "manifest.json").stat().st_mtime_ns
    assert EmbeddedBenchmark(root=str(built), **TINY).prepare() == built
    assert (built / "manifest.json").stat().st_mtime_ns == stamp
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "other.txt").write_text("not ours")
    with pytest.raises(FileExistsError, match="no complete build"):
        EmbeddedBenchmark(root=str(tmp_path / "x"), **TINY).prepare()


def test_default_root_depends_on_parameters() -> None:
    a, b = EmbeddedBenchmark(**TINY), EmbeddedBenchmark(**{**TINY, "seed": 9})
    assert a.root.parent == REPO_ROOT / "cache" / "embedded" and a.root != b.root


@pytest.mark.parametrize("params", [{"size": 15}, {"n_train": 0}, {"classes": ["tumour"]}, {"z_band": [10, 20]},
                                    {"slices_per_subject": 0}, {"slice_spacing": 0.1}])
def test_invalid_parameters(params: dict) -> None:
    with pytest.raises(ValueError):
        EmbeddedBenchmark(**{**TINY, **params})


def test_embedded_config_builds_every_loader(built: Path) -> None:
    config = load_config(REPO_ROOT / "projects/normative_eval/configs/_base/embedded_data.yaml",
                         [f"data.params.prepare.params.{k}={v}" for k, v in TINY.items()]
                         + [f"data.params.prepare.params.root={built}", "data.params.target_size=[32,32]"])
    data = build(config["data"], "data", base=DataModule)
    assert data.test_set_names == ["healthy_test", *CLASSES]
    batch = next(iter(data.train_dataloader()))
    assert batch.image.shape == (2, 1, 32, 32) and batch.brain_mask is not None and batch.anomaly_mask is None
    for name in CLASSES:
        info = data.dataset_info(name)
        assert info.pathological and info.has_anomaly_mask and info.size == TINY["n_per_class"]
        test = next(iter(data.eval_dataloader(name)))
        assert test.anomaly_mask.sum() > 0 and test.label.tolist() == [1] * TINY["n_per_class"]
    assert not data.dataset_info("healthy_test").pathological
    assert all(p.is_relative_to(built) for p in data.split_files())


def test_grid_cli(built: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--root", str(built), "--grid", str(tmp_path / "grid.png")]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert main(args) == 0
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(built) in capsys.readouterr().out
