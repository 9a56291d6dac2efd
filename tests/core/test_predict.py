"""``experiment.task: predict``: geometry round trips, the training run's thresholds, bad inputs, 2-D files."""

import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.evaluation.thresholds import Thresholds
from core.Main import main
from core.prediction.inference import Preprocessing, predict_scan
from core.prediction.scans import from_slices, read_scan, to_slices, volume_from_slices
from dl_utils.checkpoint import save_checkpoint
from model_zoo.ae import AutoEncoder
from model_zoo.base import AnomalyModel, AnomalyOutput
from optim.metrics.segmentation import ThresholdResult

SIZE = 16
MODEL = {"module_name": "model_zoo.ae", "class_name": "AutoEncoder",
         "params": {"channels": [4, 8], "latent_channels": 8, "kernel_size": 3, "norm": "none"}}
DATA = {"module_name": "core.DataLoader", "class_name": "DataModule",
        "params": {"target_size": [SIZE, SIZE], "intensity": "minmax", "train": {"glob": "no_such_folder/*.png"}}}
# Voxel axes -> (A, S, L): permuted, one axis flipped, anisotropic spacing, translated.
AFFINE = np.array([[0.0, 0.0, -2.0, 10.0], [1.2, 0.0, 0.0, -5.0], [0.0, 3.0, 0.0, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _smooth_volume(shape, seed=0):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    phases = rng.uniform(0, 2 * np.pi, size=3)
    return (100 + 40 * np.sin(3 * grids[0] + phases[0]) * np.cos(2 * grids[1] + phases[1])
            + 30 * grids[-1]).astype(np.float32)


@pytest.fixture()
def run(tmp_path, one_thread):
    """A training run folder: a random-init tiny AE checkpoint and a thresholds.json from its own maps."""
    torch.manual_seed(0)
    model = AutoEncoder(**MODEL["params"]).eval()
    training_config = {"name": "tiny", "data": DATA, "model": MODEL}
    weights = save_checkpoint(tmp_path / "train" / "checkpoints" / "best.pt",
                              {"model": model.state_dict(), "config": training_config})
    with torch.no_grad():
        maps = model.get_anomaly(torch.rand(8, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))).anomaly_map
    quantiles = torch.quantile(maps.flatten(), torch.tensor([0.95, 0.5])).tolist()
    points = tuple(ThresholdResult(threshold=q, target_fpr=f, achieved_fpr=f, region="foreground", n_images=4,
                                   n_pixels=100) for q, f in zip(quantiles, (0.01, 0.05), strict=True))
    Thresholds(dataset="val", region="foreground", n_images=4, points=points).save(weights.parent / "thresholds.json")
    return {"root": tmp_path, "weights": weights, "thresholds": {"fpr0.01": quantiles[0], "fpr0.05": quantiles[1]},
            "config": training_config}


def _predict(run, predict, *extra):
    config = {**run["config"], "experiment": {"task": "predict", "weights": str(run["weights"]), "device": "cpu",
                                              "output_dir": str(run["root"] / "runs")},
              "wandb": {"mode": "disabled"}, "predict": {"output_dir": str(run["root"] / "out"), **predict}}
    path = run["root"] / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["--config_path", str(path), *extra])


def _scores(run):
    with (run["root"] / "out" / "scores.csv").open() as f:
        return list(csv.DictReader(f))


def test_volume_slicing_inverts_for_any_orientation():
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    for affine in (np.eye(4), AFFINE, np.diag([-1.0, -2.0, 0.5, 1.0])):
        ornt = nib.orientations.io_orientation(affine)
        slices = to_slices(data, ornt)
        canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(data, affine)).dataobj)
        assert np.array_equal(slices[2], np.flipud(canonical[:, :, 2].T))  # the reader's display orientation
        assert np.array_equal(from_slices(slices, data.shape, ornt), data)


class InputAsMap(AnomalyModel):
    """The anomaly map is the preprocessed input itself, so a correct round trip reproduces the scaled scan."""

    def training_losses(self, batch):
        raise NotImplementedError

    def get_anomaly(self, x, *, generator=None):
        return AnomalyOutput(anomaly_map=x, anomaly_score=x.mean(dim=(1, 2, 3)))


def test_maps_land_on_the_input_voxels(tmp_path):
    volume = _smooth_volume((14, 9, 6))  # axial slices run along voxel axis 1; in-plane 14 x 6 (A x L)
    brain = np.zeros(volume.shape, np.uint8)
    brain[2:11, :, 1:4] = 1
    nib.save(nib.Nifti1Image(volume, AFFINE), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(brain, AFFINE), tmp_path / "m.nii.gz")
    scan = read_scan(tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", axial_range=None, source="test")
    assert scan.slices.shape[1:] == (14, 6) and scan.n_axial == 9
    result = predict_scan(InputAsMap(), scan, Preprocessing(target_size=(SIZE, SIZE), intensity="minmax"),
                          device=torch.device("cpu"), batch_size=4, seed=0)
    native = volume_from_slices(scan, result.maps)
    assert native.shape == volume.shape
    assert np.all(native[brain == 0] == 0)
    expected = np.zeros_like(volume)
    for k in range(volume.shape[1]):  # per-slice min-max, as the preprocessing does
        plane = volume[:, k, :]
        expected[:, k, :] = (plane - plane.min()) / (plane.max() - plane.min())
    inside = brain == 1
    assert np.abs(native[inside] - expected[inside]).max() < 0.08


def test_3d_volume_maps_and_masks_keep_shape_affine_and_training_thresholds(run, caplog):
    volume = _smooth_volume((14, 20, 6))
    nib.save(nib.Nifti1Image(volume, AFFINE), run["root"] / "scan.nii.gz")
    with caplog.at_level(logging.INFO):
        assert _predict(run, {"inputs": [str(run["root"] / "scan.nii.gz")], "axial_range": [3, 15]}) == 0
    out = run["root"] / "out"
    anomaly = nib.load(out / "scan_anomaly_map.nii.gz")
    assert anomaly.shape == volume.shape and np.allclose(anomaly.affine, AFFINE)
    (manifest_path,) = (run["root"] / "runs").rglob("manifest.json")
    assert json.loads(manifest_path.read_text())["predict_model"] == {}  # the AE uses no substitutable backend
    values = np.asarray(anomaly.dataobj)
    assert not values[:, :3].any() and not values[:, 16:].any() and values[:, 3:16].any()  # only the range
    for name, threshold in run["thresholds"].items():
        mask = nib.load(out / f"scan_mask_{name}.nii.gz")
        assert mask.shape == volume.shape and np.allclose(mask.affine, AFFINE)
        binary = np.asarray(mask.dataobj)
        assert 0 < binary.sum() < binary[:, 3:16].size
        assert np.array_equal(binary == 1, values > threshold)
    rows = _scores(run)
    slices = [r for r in rows if r["kind"] == "slice"]
    (vol,) = [r for r in rows if r["kind"] == "volume"]
    assert [int(r["slice"]) for r in slices] == list(range(3, 16))
    assert float(vol["score"]) == pytest.approx(max(float(r["score"]) for r in slices))
    canonical = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(values, AFFINE)).dataobj)
    for r in slices:
        above = int((canonical[:, :, int(r["slice"])] > run["thresholds"]["fpr0.05"]).sum())
        assert int(r["above_fpr0.05"]) == above and int(r["exceeds_fpr0.05"]) == int(above > 0)
    assert len(list(out.glob("scan_overlay_slice*.png"))) == 3
    (table,) = (run["root"] / "runs" / "normative_eval" / "tiny_predict").rglob("tables/predict__scores.csv")
    assert str(run["root"] / "scan.nii.gz") in table.read_text()
    run_dir = table.parents[1]  # the ExperimentLogger got the table and the overlays
    assert sorted(p.name for p in (run_dir / "figures").glob("predict__scan_overlay_slice*.png")) == sorted(
        f"predict__{p.name}" for p in out.glob("scan_overlay_slice*.png"))
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == 14


def test_score_rows_have_one_type_per_column_as_wandb_tables_need(run):
    from core.prediction.inference import SliceMaps
    from core.prediction.outputs import score_rows
    from core.prediction.thresholds import Threshold

    nib.save(nib.Nifti1Image(_smooth_volume((6, 5, 4)), np.eye(4)), run["root"] / "v.nii.gz")
    scan = read_scan(run["root"] / "v.nii.gz", None, axial_range=None, source="test")
    result = SliceMaps(maps=np.ones((4, 5, 6), np.float32), scores=np.arange(4.0), inputs=np.zeros((4, 8, 8)))
    rows = score_rows(scan, result, [Threshold(name="fpr0.05", value=0.5, source="x")], "v")
    assert [r["kind"] for r in rows] == ["slice"] * 4 + ["volume"]
    for column in rows[0]:
        assert len({type(r[column]) for r in rows if r[column] is not None}) == 1, column


def test_2d_nifti_and_chosen_fpr(run):
    image = _smooth_volume((12, 7))
    affine = np.diag([0.8, 1.5, 4.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), run["root"] / "flat.nii")
    assert _predict(run, {"inputs": [str(run["root"] / "flat.nii")], "fprs": [0.05]}) == 0
    out = run["root"] / "out"
    anomaly = nib.load(out / "flat_anomaly_map.nii.gz")
    assert anomaly.shape == (12, 7) and np.allclose(anomaly.affine, affine)
    binary = np.asarray(nib.load(out / "flat_mask_fpr0.05.nii.gz").dataobj)
    assert np.array_equal(binary == 1, np.asarray(anomaly.dataobj) > run["thresholds"]["fpr0.05"])
    assert not (out / "flat_mask_fpr0.01.nii.gz").exists()
    assert [r["kind"] for r in _scores(run)] == ["image"]


def test_png_input_gives_npy_map_png_masks_and_overlay(run):
    pixels = np.clip(_smooth_volume((10, 18)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(run["root"] / "slice.png")
    assert _predict(run, {"inputs": [str(run["root"] / "*.png")], "threshold_values": [0.3]}) == 0
    out = run["root"] / "out"
    anomaly = np.load(out / "slice_anomaly_map.npy")
    assert anomaly.shape == (10, 18) and anomaly.any()
    mask = np.asarray(Image.open(out / "slice_mask_value0.3.png"))
    assert np.array_equal(mask == 255, anomaly > 0.3)
    assert (out / "slice_overlay.png").is_file()


def _bad_inputs(root):
    good = _smooth_volume((8, 8, 5))
    files = {"good": root / "good.nii.gz", "corrupt": root / "corrupt.nii.gz", "four_d": root / "four_d.nii.gz",
             "wrong_mask": root / "wrong_mask.nii.gz", "no_brain": root / "no_brain.nii.gz"}
    nib.save(nib.Nifti1Image(good, np.eye(4)), files["good"])
    files["corrupt"].write_bytes(b"not a nifti file at all")
    nib.save(nib.Nifti1Image(np.stack([good, good], axis=-1), np.eye(4)), files["four_d"])
    nib.save(nib.Nifti1Image(good, np.eye(4)), files["wrong_mask"])
    nib.save(nib.Nifti1Image(good, np.eye(4)), files["no_brain"])
    masks = {k: root / f"{k}_mask.nii.gz" for k in files}
    for key, path in masks.items():
        shape = (8, 8, 4) if key == "wrong_mask" else (8, 8, 5)
        value = 0 if key == "no_brain" else 1
        nib.save(nib.Nifti1Image(np.full(shape, value, np.uint8), np.eye(4)), path)
    order = ["corrupt", "good", "four_d", "wrong_mask", "no_brain"]
    for name, source in (("inputs.csv", files), ("masks.csv", masks)):
        (root / name).write_text("filename\n" + "".join(f"{source[k]}\n" for k in order))
    return files


def test_bad_inputs_are_named_and_skipped(run, caplog):
    files = _bad_inputs(run["root"])
    predict = {"inputs": [str(run["root"] / "inputs.csv")], "masks": [str(run["root"] / "masks.csv")]}
    with caplog.at_level(logging.INFO):
        assert _predict(run, predict) == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for key, reason in (("corrupt", "cannot read as NIfTI"), ("four_d", "3-D volume"),
                        ("wrong_mask", "differs from"), ("no_brain", "no brain")):
        assert any(str(files[key].name) in e and reason in e for e in errors), (key, errors)
    assert {r["input"] for r in _scores(run)} == {str(files["good"])}
    with (run["root"] / "out" / "skipped.csv").open() as f:
        assert [Path(r["input"]).name for r in csv.DictReader(f)] == [
            "corrupt.nii.gz", "four_d.nii.gz", "wrong_mask.nii.gz", "no_brain.nii.gz"]
    assert "1 of 5 inputs predicted in" in caplog.text and "s, 4 skipped" in caplog.text


def test_bad_input_stops_the_run_with_exit_code_1(run, caplog):
    files = _bad_inputs(run["root"])
    predict = {"inputs": [str(run["root"] / "inputs.csv")], "masks": [str(run["root"] / "masks.csv")],
               "on_error": "stop"}
    assert _predict(run, predict) == 1
    assert str(files["corrupt"]) in caplog.text and "stopped at the first bad input" in caplog.text
    assert not (run["root"] / "out" / "good_anomaly_map.nii.gz").exists()


@pytest.mark.parametrize(
    ("predict", "message"),
    [
        ({"inptus": ["x"]}, "predict.inptus: unknown key"),
        ({"inputs": ["no/such/file.nii"]}, "predict.inputs[0]"),
        ({"inputs": ["SCAN"], "fprs": [0.2]}, "no threshold at fpr 0.2; available: 0.01, 0.05"),
        ({"inputs": ["SCAN"], "on_error": "ignore"}, "predict.on_error: 'ignore' is not one of"),
        ({"inputs": ["SCAN"], "thresholds_file": "nowhere/thresholds.json"}, "predict.thresholds_file: "),
        ({"inputs": ["SCAN"], "masks": ["SCAN", "SCAN"]}, "predict.masks: 2 mask files for 1 inputs"),
    ],
)
def test_bad_predict_blocks_name_the_yaml_path_and_exit_2(run, caplog, predict, message):
    nib.save(nib.Nifti1Image(_smooth_volume((6, 6, 3)), np.eye(4)), run["root"] / "s.nii.gz")
    predict = {k: ([str(run["root"] / "s.nii.gz")] * len(v) if set(v) == {"SCAN"} else v)
               for k, v in predict.items()}
    assert _predict(run, predict) == 2
    assert message in caplog.text


def test_dry_run_checks_everything_but_reads_no_scan(run):
    (run["root"] / "broken.nii.gz").write_bytes(b"broken")
    assert _predict(run, {"inputs": [str(run["root"] / "broken.nii.gz")]}, "--dry-run") == 0
    assert not (run["root"] / "runs").exists() and not (run["root"] / "out").exists()


def test_raw_scan_with_a_unit_intensity_model_is_a_bad_input_with_a_hint(run, caplog):
    nib.save(nib.Nifti1Image(_smooth_volume((6, 6, 3)), np.eye(4)), run["root"] / "raw.nii.gz")
    assert _predict(run, {"inputs": [str(run["root"] / "raw.nii.gz")], "intensity": "unit"}) == 0
    assert "raw.nii.gz: intensity 'unit' needs values in [0,1]" in caplog.text
    assert "set predict.intensity" in caplog.text and "0 of 1 inputs predicted" in caplog.text
