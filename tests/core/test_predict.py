"""``experiment.task: predict``: geometry round trips, the training run's thresholds, bad inputs, 2-D files, the
output folder, input expansion."""

import csv
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from core.Configurator import build
from core.evaluation.thresholds import MaskCalibration, Thresholds
from core.Main import main
from core.prediction.inference import Preprocessing, predict_scan
from core.prediction.scans import from_slices, read_scan, to_slices, volume_from_slices
from dl_utils.checkpoint import save_checkpoint
from dl_utils.reinit import randomize_zero_layers
from model_zoo.ae import AutoEncoder
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.registry import method
from optim.metrics.segmentation import ThresholdResult

SIZE = 16
MODEL = {"module_name": "model_zoo.ae", "class_name": "AutoEncoder",
         "params": {"channels": [4, 8], "latent_channels": 8, "kernel_size": 3, "norm": "none"}}
DATA = {"module_name": "core.data_module", "class_name": "DataModule",
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


def test_a_calibrated_mask_threshold_is_read_beside_the_weights_and_passed_per_call(tmp_path, one_thread, caplog):
    block = method("autoddpm").block(tmp_path)
    block["params"].update(tau="calibrated", perceptual={"net": "squeeze", "backend": "random", "spatial_size": 32})
    torch.manual_seed(0)
    model = build(block, "model", base=AnomalyModel).eval()
    randomize_zero_layers(model)
    config = {"name": "auto", "data": DATA, "model": block}
    weights = save_checkpoint(tmp_path / "train" / "checkpoints" / "best.pt",
                              {"model": model.state_dict(), "config": config})
    run = {"root": tmp_path, "weights": weights, "config": config}
    Image.fromarray(np.clip(_smooth_volume((10, 18)), 0, 255).astype(np.uint8)).save(tmp_path / "slice.png")
    predict = {"inputs": [str(tmp_path / "slice.png")], "threshold_values": [0.3]}
    assert _predict(run, predict) == 2 and "tau: calibrated but" in caplog.text and "is missing" in caplog.text
    scan = read_scan(tmp_path / "slice.png", None, axial_range=None, source="test")
    prep = Preprocessing(target_size=(SIZE, SIZE), intensity="minmax")
    inputs = torch.from_numpy(predict_scan(model, scan, prep, device=torch.device("cpu"), batch_size=1, seed=42,
                                           mask_threshold=0.0).inputs)[:, None]
    value = float(model.mask_statistic(inputs, generator=torch.Generator().manual_seed(42)).median())
    calibration = MaskCalibration(value=value, target_fpr=0.05, achieved_fpr=0.05, dataset="val", n_images=4,
                                  n_pixels=100, region="foreground", model={})
    calibration.save(weights.parent / MaskCalibration.FILE_NAME)
    assert _predict(run, predict) == 0
    expected, other = (predict_scan(model, scan, prep, device=torch.device("cpu"), batch_size=1, seed=42,
                                    mask_threshold=v).maps[0] for v in (value, 2 * value))
    written = np.load(tmp_path / "out" / "slice_anomaly_map.npy")
    assert np.array_equal(written, expected) and not np.array_equal(written, other)  # this value, every call
    manifests = sorted((tmp_path / "runs").rglob("manifest.json"))
    manifest = json.loads(manifests[-1].read_text())
    assert manifest["predict_mask_threshold"]["value"] == value
    assert manifest["predict_model"]["mask_threshold"] == f"calibrated: {value:.4g} at FPR 0.05 on 'val' (4 images)"
    assert manifest["predict_model"]["perceptual"] == model.provenance()["perceptual"]


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
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # skipping is no error: one warning each
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for key, reason in (("corrupt", "cannot read as NIfTI"), ("four_d", "3-D volume"),
                        ("wrong_mask", "differs from"), ("no_brain", "no brain")):
        assert sum(str(files[key].name) in w and reason in w for w in warnings) == 1, (key, warnings)
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
    assert _predict(run, {"inputs": [str(run["root"] / "raw.nii.gz")], "intensity": "unit"}) == 1  # none predicted
    assert "raw.nii.gz: intensity 'unit' needs values in [0,1]" in caplog.text
    assert "set predict.intensity" in caplog.text and "0 of 1 inputs predicted" in caplog.text


def _no_pixel_dicom(path):
    import pydicom

    from tests.data.test_readers import _write_dicom

    _write_dicom(path, np.ones((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData  # pydicom's pixel_array raises AttributeError for it
    ds.save_as(path)
    return path


def _zero_affine_nifti(path):
    """A 3-D NIfTI whose sform is all zeros (nibabel refuses to write one: the bytes are patched)."""
    img = nib.Nifti1Image(_smooth_volume((6, 6, 4)), np.eye(4))
    img.header.set_sform(np.eye(4), code=1)
    img.header.set_qform(None, code=0)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    raw[280:328] = np.zeros(12, "<f4").tobytes()  # srow_x, srow_y, srow_z of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    return path


def test_every_kind_of_unreadable_input_is_one_skipped_line(run, caplog, monkeypatch):
    root = run["root"]
    Image.fromarray(np.clip(_smooth_volume((6, 8)), 0, 255).astype(np.uint8)).save(root / "good.png")
    Image.fromarray(np.zeros((12, 12), np.uint8) + 7).save(root / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # huge.png: 144 pixels > 2 x 50, a "bomb"
    _no_pixel_dicom(root / "nopixels.dcm")
    (root / "notes.txt").write_text("not a scan")
    _zero_affine_nifti(root / "flat_affine.nii")
    names = ["good.png", "huge.png", "nopixels.dcm", "notes.txt", "flat_affine.nii", "gone.png"]
    (root / "inputs.csv").write_text("filename\n" + "".join(f"{root / n}\n" for n in names))
    with caplog.at_level(logging.INFO):
        assert _predict(run, {"inputs": [str(root / "inputs.csv")], "threshold_values": [0.3]}) == 0
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    reasons = {"huge.png": "DecompressionBombError", "nopixels.dcm": "a DICOM without pixel data",
               "notes.txt": "unsupported file type", "flat_affine.nii": "is degenerate",
               "gone.png": "not found or not a regular file"}
    warnings = [r.getMessage() for r in caplog.records if "bad input, skipped" in r.getMessage()]
    for name, reason in reasons.items():
        assert sum(name in w and reason in w for w in warnings) == 1, (name, warnings)
    with (root / "out" / "skipped.csv").open() as f:
        assert [Path(r["input"]).name for r in csv.DictReader(f)] == names[1:]
    assert "1 of 6 inputs predicted" in caplog.text and {r["input"] for r in _scores(run)} == {str(root / "good.png")}


def test_a_bug_in_our_code_is_not_a_skipped_input(run, monkeypatch):
    nib.save(nib.Nifti1Image(_smooth_volume((6, 6, 3)), np.eye(4)), run["root"] / "s.nii.gz")

    def broken(data, ornt):
        raise IndexError("our bug")

    monkeypatch.setattr("core.prediction.scans.to_slices", broken)
    with pytest.raises(IndexError, match="our bug"):
        _predict(run, {"inputs": [str(run["root"] / "s.nii.gz")]})


def test_no_input_predicted_exits_1_and_says_why(run, caplog):
    (run["root"] / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _no_pixel_dicom(run["root"] / "b.dcm")
    predict = {"inputs": [str(run["root"] / "a.png"), str(run["root"] / "b.dcm")], "threshold_values": [0.3]}
    assert _predict(run, predict) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "predict: 0 of 2 inputs predicted in" in error and "2 skipped" in error
    assert f"no input was predicted, so the prediction failed: each input's reason is on its own line above and in " \
           f"{run['root'] / 'out' / 'skipped.csv'}" in error
    (manifest_path,) = (run["root"] / "runs").rglob("manifest.json")
    assert json.loads(manifest_path.read_text())["predict_counts"] == {"inputs": 2, "predicted": 0, "skipped": 2}


def _two_scans(root):
    for name, seed in (("a", 0), ("b", 1)):
        nib.save(nib.Nifti1Image(_smooth_volume((8, 8, 3), seed=seed), np.eye(4)), root / f"{name}.nii.gz")


def test_an_output_folder_that_holds_files_is_refused_before_anything_is_written(run, caplog):
    _two_scans(run["root"])
    out = run["root"] / "out"
    out.mkdir()
    (out / "scores.csv").write_text("the user's own table\n")
    for extra in ((), ("--dry-run",)):
        caplog.clear()
        assert _predict(run, {"inputs": [str(run["root"] / "a.nii.gz")]}, *extra) == 2
        assert f"predict.output_dir: {out} already holds 1 entries (scores.csv)" in caplog.text
        assert "set predict.overwrite: true" in caplog.text
    assert (out / "scores.csv").read_text() == "the user's own table\n" and sorted(os.listdir(out)) == ["scores.csv"]
    assert not (run["root"] / "runs").exists()


def test_overwrite_removes_the_earlier_predictions_outputs_and_keeps_other_files(run, caplog):
    _two_scans(run["root"])
    (run["root"] / "broken.nii.gz").write_bytes(b"broken")
    first = [str(run["root"] / n) for n in ("a.nii.gz", "broken.nii.gz")]
    assert _predict(run, {"inputs": first}) == 0
    out = run["root"] / "out"
    earlier = set(os.listdir(out))
    assert {"skipped.csv", "scores.csv", "a_anomaly_map.nii.gz", "predict_outputs.txt"} <= earlier
    (out / "notes.txt").write_text("mine")
    assert _predict(run, {"inputs": [str(run["root"] / "b.nii.gz")], "overwrite": True}) == 0
    now = set(os.listdir(out))
    assert not any(name.startswith("a_") for name in now) and "skipped.csv" not in now  # nothing stale
    assert (out / "notes.txt").read_text() == "mine" and "b_anomaly_map.nii.gz" in now
    assert {r["input"] for r in _scores(run)} == {str(run["root"] / "b.nii.gz")}
    recorded = (out / "predict_outputs.txt").read_text().splitlines()
    assert recorded[0].startswith("# files written by the prediction run ")
    assert sorted(recorded[1:]) == sorted(now - {"notes.txt", "predict_outputs.txt"})
    assert "1 entries of" in caplog.text and "(notes.txt)" in caplog.text  # the file that stays is named


def test_an_overwritten_output_folder_may_not_hold_an_input(run, caplog):
    _two_scans(run["root"])
    out = run["root"] / "out"
    out.mkdir()
    (run["root"] / "a.nii.gz").rename(out / "a.nii.gz")
    assert _predict(run, {"inputs": [str(out / "a.nii.gz")], "overwrite": True}) == 2
    assert f"predict.output_dir: {out} holds the input {out / 'a.nii.gz'}" in caplog.text


def test_glob_over_a_symlink_loop_ends_and_predicts_each_file_once(run, caplog):
    scans = run["root"] / "scans"
    (scans / "sub").mkdir(parents=True)
    for name, seed in (("a", 0), ("sub/b", 1)):
        nib.save(nib.Nifti1Image(_smooth_volume((8, 8, 3), seed=seed), np.eye(4)), scans / f"{name}.nii.gz")
    (scans / "sub" / "up").symlink_to("..")  # a loop: scans/sub/up/sub/up/...
    (scans / "again").symlink_to(".")
    (scans / "alias.nii.gz").symlink_to("a.nii.gz")  # one file, two names
    with caplog.at_level(logging.INFO):
        assert _predict(run, {"inputs": [str(scans / "**" / "*.nii.gz")]}) == 0
    assert {r["input"] for r in _scores(run)} == {str(scans / "a.nii.gz"), str(scans / "sub" / "b.nii.gz")}
    assert f"{scans / 'alias.nii.gz'} (glob " in caplog.text and "each predicted once" in caplog.text


def test_glob_files_matches_glob_without_links_and_enters_each_folder_once(tmp_path):
    import glob

    from core.prediction.scans import glob_files

    for name in ("x.png", "a/y.png", "a/b/z.png", "a/b/n.txt", ".hidden/h.png", "a/.dot.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    for pattern in ("**/*.png", "*/*.png", "a/**/z.png", "**/.*.png", "**", "a/b/*", "*.png", "no/**/*.png"):
        expected = sorted(p for p in glob.glob(str(tmp_path / pattern), recursive=True) if Path(p).is_file())
        assert [str(p) for p in glob_files(tmp_path / pattern)] == expected, pattern
    (tmp_path / "a" / "b" / "up").symlink_to("..")
    (tmp_path / "a" / "twin").symlink_to("b")
    assert [p.relative_to(tmp_path).as_posix() for p in glob_files(tmp_path / "**" / "*.png")] == [
        "a/b/z.png", "a/y.png", "x.png"]  # a/twin is a/b again: entered once, by its first path
