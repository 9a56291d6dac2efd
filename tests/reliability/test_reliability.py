"""End to end: bad inputs and faults a new user meets, each run as a ``core/Main.py`` (or tool) subprocess.

Every case asserts the exit code (0 ok, 1 user error, 2 config error, 130/143 interrupted), the culprit
named in the single ERROR line (no traceback), and that nothing in an existing run folder was lost or
overwritten. The table of cases is in docs/reliability.md.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.reliability.conftest import (
    CASES,
    REPO,
    TIMEOUT_S,
    Result,
    base_config,
    case,
    env,
    faults_cmd,
    history_steps,
    interrupt_after_first_checkpoint,
    interrupted_run,
    make_data,
    manifest,
    run,
    run_dirs,
    run_main,
    snapshot,
    start_main,
    the_run,
    trained_run,
    wait_for,
    write_config,
    write_csv,
)

# The cases run in one session fixture's thread pool (conftest.outcomes): under pytest-xdist they must share a worker
# (pytest -n 2 --dist loadgroup), or each worker would start every case.
pytestmark = pytest.mark.xdist_group("reliability")


def _config(tmp: Path, **changes: object) -> Path:
    data = make_data(tmp)
    return write_config(tmp / "run.yaml", base_config(tmp, data), **changes)


def _no_run_folder(tmp: Path) -> None:
    assert run_dirs(tmp) == [], "a run folder was created although the run was refused"


def _failed_run(tmp: Path, culprit: str) -> Path:
    """The single run folder: status failed naming the culprit, no metrics.json."""
    run_dir = the_run(tmp)
    record = manifest(run_dir)
    assert record["status"] == "failed" and culprit in record["error"], record
    assert not (run_dir / "metrics.json").exists()
    return run_dir


# ------------------------------------------------------------------------------------------------ config
@case
def case_duplicate_top_level_key(tmp: Path) -> None:
    path = _config(tmp)
    path.write_text(path.read_text() + "trainer:\n  module_name: core.Trainer\n  class_name: Trainer\n")
    line = len(path.read_text().splitlines()) - 2
    result = run_main(path)
    assert result.rc == 2
    assert f"config error: {path}:{line}: duplicate key 'trainer'" in result.one_error()
    _no_run_folder(tmp)


@case
def case_duplicate_nested_key(tmp: Path) -> None:
    path = _config(tmp)
    text = path.read_text().replace("    max_epochs: 1\n", "    max_epochs: 1\n    max_epochs: 3\n")
    path.write_text(text)
    line = text.splitlines().index("    max_epochs: 3") + 1
    result = run_main(path, "--dry-run")
    assert result.rc == 2 and f"{path}:{line}: duplicate key 'max_epochs'" in result.one_error()


@case
def case_yaml_alias_bomb_fails_fast(tmp: Path) -> None:
    path = _config(tmp)
    lines = ["vars:", "  a0: &a0 [x, x, x, x, x, x, x, x, x]"]  # 9 levels of 9 aliases: 9**10 values expanded
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    result = run_main(path, "--dry-run")  # hung before the bound (the suite's timeout would end it)
    line = result.one_error()
    assert result.rc == 2 and f"config error: {path}:" in line
    assert "the document expands to more than 100000 values (YAML alias *a" in line
    _no_run_folder(tmp)


@case
def case_trainer_option_values_refused_at_dry_run(tmp: Path) -> None:
    config = base_config(tmp, make_data(tmp))
    for key, value, message in (("max_epochs", 0, "must be > 0, got 0"), ("val_interval", -1, "must be > 0, got -1"),
                                ("early_stopping_min_delta", -0.5, "must be >= 0, got -0.5")):
        result = run_main(write_config(tmp / "run.yaml", config, **{f"trainer.params.{key}": value}), "--dry-run")
        assert result.rc == 2 and f"config error: trainer.params.{key}: {message}" in result.one_error()
    _no_run_folder(tmp)


@case
def case_thread_setting_refused_at_dry_run_and_recorded(tmp: Path) -> None:
    config = base_config(tmp, make_data(tmp))
    for value, message in ((0, "a thread count must be >= 1, got 0"),
                           ("fast", "'fast' is not one of auto, torch, free (or a positive integer)")):
        result = run_main(write_config(tmp / "run.yaml", config, **{"experiment.threads": value}), "--dry-run")
        assert result.rc == 2 and f"config error: experiment.threads: {message}" in result.one_error()
    _no_run_folder(tmp)
    result = run_main(write_config(tmp / "run.yaml", config, **{"experiment.threads": 2}), OMP_NUM_THREADS="")
    assert result.rc == 0, result.stderr
    record = manifest(the_run(tmp))
    assert (record["threads"]["setting"], record["threads"]["threads"], record["torch_threads"]) == (2, 2, 2)
    shared, _, _ = trained_run(tmp / "shared")  # the default, with OMP_NUM_THREADS=1 in the environment
    assert manifest(shared)["threads"] == {**manifest(shared)["threads"], "setting": "auto", "policy": "environment",
                                           "threads": 1}


@case
def case_scientific_notation_lr_is_a_number(tmp: Path) -> None:
    path = _config(tmp)
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 1e-3"))
    assert "lr: 1e-3" in path.read_text()
    result = run_main(path)
    assert result.rc == 0, result.stderr
    resolved = yaml.safe_load((the_run(tmp) / "config.yaml").read_text())
    assert resolved["trainer"]["params"]["optimizer"]["params"]["lr"] == 0.001


@case
def case_scientific_notation_in_set_override(tmp: Path) -> None:
    result = run_main(_config(tmp), "--dry-run", "--set", "trainer.params.optimizer.params.lr=5e-4",
                      "--set", "trainer.params.early_stopping_min_delta=1E-6")
    assert result.rc == 0 and "dry run OK" in result.stdout, result.stderr


@case
def case_gpu_without_cuda_is_a_config_error(tmp: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = run_main(_config(tmp, **{"experiment.device": "gpu"}))
    assert result.rc == 2 and "config error: experiment.device: 'gpu' but CUDA is not available" in result.one_error()
    _no_run_folder(tmp)


@case
def case_weights_and_resume_together_refused(tmp: Path) -> None:
    run_dir, path, config = trained_run(tmp)
    before = snapshot(run_dir)
    bad = write_config(tmp / "both.yaml", config, **{"experiment.resume": str(run_dir),
                                                     "experiment.weights": str(run_dir / "checkpoints" / "best.pt")})
    result = run_main(bad)
    assert result.rc == 2 and "experiment.weights and experiment.resume: give one" in result.one_error()
    assert snapshot(run_dir) == before


@case
def case_missing_weights_file(tmp: Path) -> None:
    result = run_main(_config(tmp, **{"experiment.task": "evaluate", "experiment.weights": str(tmp / "no.pt")}))
    assert result.rc == 2 and f"experiment.weights: file not found: {tmp / 'no.pt'}" in result.one_error()
    _no_run_folder(tmp)


@case
def case_resume_of_a_folder_without_checkpoint(tmp: Path) -> None:
    (tmp / "not_a_run").mkdir()
    result = run_main(_config(tmp, **{"experiment.resume": str(tmp / "not_a_run")}))
    assert result.rc == 2 and "not_a_run/checkpoints/latest.pt not found" in result.one_error()


@case
def case_unknown_trainer_parameter(tmp: Path) -> None:
    result = run_main(_config(tmp, **{"trainer.params.max_epoch": 2}))
    assert result.rc == 2
    assert "trainer.params.max_epoch: unknown parameter (did you mean 'max_epochs'?)" in result.one_error()
    _no_run_folder(tmp)


# ------------------------------------------------------------------------------------------------ data
@case
def case_missing_image_names_csv_row(tmp: Path) -> None:
    path = _config(tmp)
    csv = tmp / "data" / "train.csv"
    csv.write_text(csv.read_text() + f"{tmp / 'data' / 'gone.png'}\n")
    result = run_main(path)
    line = result.one_error()
    assert result.rc == 1 and "data error:" in line
    assert f"file not found: {tmp / 'data' / 'gone.png'} ({csv} row 9)" in line
    _no_run_folder(tmp)


@case
def case_empty_csv(tmp: Path) -> None:
    path = _config(tmp)
    (tmp / "data" / "val.csv").write_text("")
    result = run_main(path)
    assert result.rc == 1
    assert f"data error: {tmp / 'data' / 'val.csv'}: needs a header row with a 'filename' column" in result.one_error()
    _no_run_folder(tmp)


@case
def case_header_only_csv(tmp: Path) -> None:
    path = _config(tmp)
    (tmp / "data" / "train.csv").write_text("filename\n")
    result = run_main(path)
    assert result.rc == 1 and "split 'train' is empty (no image rows)" in result.one_error()
    assert str(tmp / "data" / "train.csv") in result.one_error()
    _no_run_folder(tmp)


@case
def case_missing_csv(tmp: Path) -> None:
    path = _config(tmp)
    (tmp / "data" / "val.csv").unlink()
    result = run_main(path)
    assert result.rc == 1 and f"split CSV not found: {tmp / 'data' / 'val.csv'}" in result.one_error()
    _no_run_folder(tmp)


@case
def case_misaligned_image_and_mask_csvs(tmp: Path) -> None:
    data = make_data(tmp)
    masks = data["train_masks"]
    masks.write_text("\n".join(masks.read_text().splitlines()[:-2]) + "\n")
    config = base_config(tmp, data)
    config["data"]["params"]["train"]["masks"] = [str(masks)]
    result = run_main(write_config(tmp / "run.yaml", config))
    line = result.one_error()
    assert result.rc == 1 and "split 'train': 8 image rows but 6 masks rows" in line
    assert f"masks CSVs {masks}" in line
    _no_run_folder(tmp)


@case
def case_wrong_mask_size(tmp: Path) -> None:
    data = make_data(tmp)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp / "data" / "train_mask2.png")
    config = base_config(tmp, data)
    config["data"]["params"]["train"]["masks"] = [str(data["train_masks"])]
    result = run_main(write_config(tmp / "run.yaml", config))
    line = result.one_error()
    assert result.rc == 1 and "data error:" in line
    assert "train_mask2.png: mask shape (16, 16) differs from image" in line
    assert f"({data['train_masks'].parent / 'train.csv'} row 3)" in line
    _failed_run(tmp, "train_mask2.png")


@case
def case_corrupt_png(tmp: Path) -> None:
    path = _config(tmp)
    (tmp / "data" / "train3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    result = run_main(path)
    line = result.one_error()
    assert result.rc == 1 and f"{tmp / 'data' / 'train3.png'}: cannot read as image" in line
    assert f"{tmp / 'data' / 'train.csv'} row 4" in line
    _failed_run(tmp, "train3.png")


@case
def case_corrupt_png_in_a_loader_worker(tmp: Path) -> None:
    path = _config(tmp, **{"data.params.num_workers": 1})
    (tmp / "data" / "train5.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    result = run_main(path)
    line = result.one_error()  # the worker's re-raised error: its last line, not torch's wrapper text
    assert result.rc == 1 and f"data error: {tmp / 'data' / 'train5.png'}: cannot read as image" in line
    assert "Caught" not in line and "train.csv row 6" in line


@case
def case_truncated_png(tmp: Path) -> None:
    path = _config(tmp)
    target = tmp / "data" / "val1.png"
    target.write_bytes(target.read_bytes()[:200])
    result = run_main(path)
    line = result.one_error()
    assert result.rc == 1 and f"{target}: cannot read as image" in line and "val.csv row 2" in line
    _failed_run(tmp, "val1.png")


@case
def case_unreadable_npy(tmp: Path) -> None:
    path = _config(tmp)
    bad = tmp / "data" / "obj.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # needs pickle: refused by the reader
    csv = tmp / "data" / "train.csv"
    csv.write_text(csv.read_text() + f"{bad}\n")
    result = run_main(path)
    line = result.one_error()
    assert result.rc == 1 and f"{bad}: cannot read as npy" in line and "train.csv row 9" in line


@case
def case_nan_in_image(tmp: Path) -> None:
    path = _config(tmp)
    bad = tmp / "data" / "nan.npy"
    np.save(bad, np.full((32, 32), np.nan, np.float32))
    write_csv(tmp / "data" / "val.csv", [bad])
    result = run_main(path)
    assert result.rc == 1 and f"{bad}: contains NaN or infinite values" in result.one_error()


@case
def case_unsupported_file_type(tmp: Path) -> None:
    path = _config(tmp)
    bad = tmp / "data" / "notes.txt"
    bad.write_text("hello")
    write_csv(tmp / "data" / "val.csv", [bad])
    result = run_main(path)
    assert result.rc == 1 and f"{bad}: unsupported file type" in result.one_error()


@case
def case_debug_log_level_shows_the_traceback(tmp: Path) -> None:
    path = _config(tmp)
    (tmp / "data" / "train3.png").write_bytes(b"garbage")
    result = run_main(path, "--log_level", "DEBUG")
    assert result.rc == 1 and "Traceback" in result.stderr and "DataReadError" in result.stderr


# ------------------------------------------------------------------------------------------------ checkpoints
def _other_architecture_checkpoint(tmp: Path) -> Path:
    from model_zoo.ae import AutoEncoder

    path = tmp / "other.pt"
    torch.save({"model": AutoEncoder(channels=[8, 16], latent_channels=16).state_dict()}, path)
    return path


@case
def case_weights_of_another_architecture(tmp: Path) -> None:
    other = _other_architecture_checkpoint(tmp)
    result = run_main(_config(tmp, **{"experiment.task": "evaluate", "experiment.weights": str(other)}))
    line = result.one_error()
    assert result.rc == 1 and f"checkpoint error: 'model' weights of {other} does not fit AutoEncoder" in line
    _no_run_folder(tmp)


@case
def case_text_file_as_weights(tmp: Path) -> None:
    text = tmp / "weights.txt"
    text.write_text("these are not weights\n")
    result = run_main(_config(tmp, **{"experiment.task": "evaluate", "experiment.weights": str(text)}))
    assert result.rc == 1
    assert f"checkpoint error: cannot read checkpoint {text} (not a torch checkpoint" in result.one_error()
    _no_run_folder(tmp)


@case
def case_truncated_weights(tmp: Path) -> None:
    run_dir, path, config = trained_run(tmp)
    truncated = tmp / "truncated.pt"
    best = (run_dir / "checkpoints" / "best.pt").read_bytes()
    truncated.write_bytes(best[: len(best) // 2])
    bad = write_config(tmp / "eval.yaml", config, **{"experiment.task": "evaluate",
                                                     "experiment.weights": str(truncated)})
    result = run_main(bad)
    assert result.rc == 1 and f"cannot read checkpoint {truncated}" in result.one_error()
    assert len(run_dirs(tmp)) == 1  # only the training run


@case
def case_weights_initialise_training(tmp: Path) -> None:
    run_dir, path, config = trained_run(tmp)
    best = run_dir / "checkpoints" / "best.pt"
    init = write_config(tmp / "init.yaml", config, name="init", **{"experiment.weights": str(best)})
    result = run_main(init)
    assert result.rc == 0, result.stderr
    (new_dir,) = [d for d in run_dirs(tmp) if d.parent.name == "init"]
    assert str(best) in manifest(new_dir)["initialised_from"]
    first_loss = json.loads((new_dir / "history.jsonl").read_text().splitlines()[0])["train/loss"]
    scratch_loss = json.loads((run_dir / "history.jsonl").read_text().splitlines()[0])["train/loss"]
    assert first_loss < scratch_loss  # training started from the trained weights, not from scratch


@case
def case_weights_of_another_architecture_for_training(tmp: Path) -> None:
    other = _other_architecture_checkpoint(tmp)
    result = run_main(_config(tmp, **{"experiment.weights": str(other)}))
    assert result.rc == 1 and "does not fit AutoEncoder" in result.one_error()
    _no_run_folder(tmp)


# ------------------------------------------------------------------------------------------------ imports
def _marker_module(tmp: Path) -> tuple[Path, Path]:
    """A module outside the project whose import writes a marker: (its folder for PYTHONPATH, the marker)."""
    folder = tmp / "modules"
    folder.mkdir()
    (folder / "h28_marker.py").write_text("from pathlib import Path\n\nPath(__file__).with_name('imported')"
                                          ".write_text('ran')\n\n\nclass Thing:\n    pass\n")
    return folder, folder / "imported"


@case
def case_config_imports_only_the_project_and_its_allow_list(tmp: Path) -> None:
    folder, marker = _marker_module(tmp)
    path = _config(tmp, model={"module_name": "h28_marker", "class_name": "Thing"})
    result = run_main(path, PYTHONPATH=f"{REPO}:{folder}")
    line = result.one_error()
    assert result.rc == 2 and "config error: model.module_name: 'h28_marker' is outside this project" in line
    assert "allow_imports" in line and not marker.exists()
    _no_run_folder(tmp)
    allowed = write_config(tmp / "allowed.yaml", yaml.safe_load(path.read_text()), allow_imports=["h28_marker"])
    result = run_main(allowed, PYTHONPATH=f"{REPO}:{folder}")  # the user's own list: imported, then refused
    assert result.rc == 2 and "h28_marker.Thing is not a subclass of TrainableModel" in result.one_error()
    assert marker.exists()
    _no_run_folder(tmp)


@case
def case_checkpoint_config_imports_nothing(tmp: Path) -> None:
    run_dir, _, config = trained_run(tmp)
    folder, marker = _marker_module(tmp)
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["model"] = {"module_name": "h28_marker", "class_name": "Thing"}
    planted = tmp / "planted.pt"
    torch.save(state, planted)
    before = snapshot(tmp / "runs")
    path = write_config(tmp / "predict.yaml", config, **{
        "experiment.task": "predict", "experiment.weights": str(planted),
        "predict": {"inputs": [str(Path(config["data"]["params"]["val"]["images"][0]).parent / "val0.png")],
                    "threshold_values": [0.1], "output_dir": str(tmp / "out")}})
    result = run_main(path, PYTHONPATH=f"{REPO}:{folder}")
    line = result.one_error()
    assert result.rc == 2 and f"experiment.weights: the config stored in {planted}: model.module_name: " in line
    assert "'h28_marker' is outside this project" in line
    assert not marker.exists(), "the checkpoint's module was imported"
    assert snapshot(tmp / "runs") == before and not (tmp / "out").exists()


# ------------------------------------------------------------------------------------------------ predict
def _predict_config(tmp: Path, name: str, config: dict, run_dir: Path, **predict: object) -> Path:
    """A predict config with the shared run's best.pt, an explicit threshold, outputs in ``tmp/<name>_out``."""
    return write_config(tmp / f"{name}.yaml", config, **{
        "experiment.task": "predict", "experiment.weights": str(run_dir / "checkpoints" / "best.pt"),
        "predict": {"threshold_values": [0.1], "output_dir": str(tmp / f"{name}_out"), **predict}})


def _scans(tmp: Path, config: dict, *names: str) -> Path:
    """``tmp/scans`` with copies of the shared run's validation PNGs (``val0.png`` ...)."""
    shared = Path(config["data"]["params"]["val"]["images"][0]).parent
    folder = tmp / "scans"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(shared / name, folder / name)
    return folder


def _no_pixel_dicom(path: Path) -> Path:
    import pydicom

    from tests.data.test_readers import _write_dicom

    _write_dicom(path, np.ones((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    del ds.PixelData  # a DICOM that is no image: pydicom's pixel_array raised AttributeError
    ds.save_as(path)
    return path


def _inputs_in(table: Path) -> list[str]:
    """The file names in the ``input`` column of ``scores.csv`` or ``skipped.csv``, once each, in order."""
    import csv

    with table.open(newline="") as f:
        return list(dict.fromkeys(Path(row["input"]).name for row in csv.DictReader(f)))


def _predicted_inputs(out: Path) -> set[str]:
    return set(_inputs_in(out / "scores.csv"))


def _warnings(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if " WARNING " in line]


@case
def case_predict_dicom_without_pixel_data_is_a_skipped_input(tmp: Path) -> None:
    run_dir, _, config = trained_run(tmp)
    before = snapshot(run_dir)
    scans = _scans(tmp, config, "val0.png")
    dicom = _no_pixel_dicom(scans / "report.dcm")
    result = run_main(_predict_config(tmp, "skip", config, run_dir, inputs=[str(scans)]))
    assert result.rc == 0 and not result.errors and "Traceback" not in result.stderr, result.stderr
    (line,) = [w for w in _warnings(result) if "bad input, skipped" in w]
    assert f"{dicom}: a DICOM without pixel data" in line
    assert "predict: 1 of 2 inputs predicted" in result.stderr
    assert _inputs_in(tmp / "skip_out" / "skipped.csv") == ["report.dcm"]
    assert _predicted_inputs(tmp / "skip_out") == {"val0.png"}
    result = run_main(_predict_config(tmp, "stop", config, run_dir, inputs=[str(scans)], on_error="stop"))
    line = result.one_error()
    assert result.rc == 1 and f"predict: bad input, stopping: {dicom}: a DICOM without pixel data" in line
    assert snapshot(run_dir) == before


@case
def case_predict_with_every_input_skipped_exits_1(tmp: Path) -> None:
    run_dir, _, config = trained_run(tmp)
    scans = _scans(tmp, config)
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _no_pixel_dicom(scans / "report.dcm")
    result = run_main(_predict_config(tmp, "none", config, run_dir, inputs=[str(scans)]))
    line = result.one_error()
    assert result.rc == 1 and "predict: 0 of 2 inputs predicted in" in line and "2 skipped" in line
    assert "no input was predicted, so the prediction failed" in line
    assert str(tmp / "none_out" / "skipped.csv") in line
    assert len([w for w in _warnings(result) if "bad input, skipped" in w]) == 2  # each reason on its own line


@case
def case_predict_into_a_folder_that_holds_files(tmp: Path) -> None:
    run_dir, _, config = trained_run(tmp)
    scans = _scans(tmp, config, "val0.png", "val1.png")
    out = tmp / "mine_out"
    out.mkdir()
    (out / "scores.csv").write_text("the user's own table\n")
    result = run_main(_predict_config(tmp, "mine", config, run_dir, inputs=[str(scans / "val0.png")]))
    line = result.one_error()
    assert result.rc == 2 and f"config error: predict.output_dir: {out} already holds 1 entries (scores.csv)" in line
    assert "predict.overwrite: true" in line
    assert (out / "scores.csv").read_text() == "the user's own table\n" and [p.name for p in out.iterdir()] == [
        "scores.csv"]
    assert len(run_dirs(tmp)) == 1  # only the copied training run: no prediction run folder
    # an earlier prediction with a skipped input, then an overwrite: nothing of the first stays
    (scans / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    first = _predict_config(tmp, "again", config, run_dir, inputs=[str(scans / "val0.png"), str(scans / "broken.png")])
    assert run_main(first).rc == 0
    again = tmp / "again_out"
    assert (again / "skipped.csv").exists() and (again / "val0_anomaly_map.npy").exists()
    (again / "notes.txt").write_text("mine")
    second = _predict_config(tmp, "again", config, run_dir, inputs=[str(scans / "val1.png")], overwrite=True)
    result = run_main(second)
    assert result.rc == 0, result.stderr
    names = {p.name for p in again.iterdir()}
    assert "skipped.csv" not in names and not any(n.startswith("val0_") for n in names), names
    assert (again / "notes.txt").read_text() == "mine" and _predicted_inputs(again) == {"val1.png"}


@case
def case_predict_glob_over_a_symlink_loop(tmp: Path) -> None:
    run_dir, _, config = trained_run(tmp)
    scans = _scans(tmp, config, "val0.png")
    (scans / "sub").mkdir()
    shutil.copy(scans / "val0.png", scans / "sub" / "val1.png")
    (scans / "sub" / "up").symlink_to("..")  # scans/sub/up/sub/up/... : glob's ** followed it without end
    (scans / "again").symlink_to(".")
    (scans / "val0_link.png").symlink_to("val0.png")  # one file, two names: the first (sorted) counts
    result = run_main(_predict_config(tmp, "loop", config, run_dir, inputs=[f"{scans}/**/*.png"]))
    assert result.rc == 0 and not result.errors, result.stderr
    assert "predict: 2 of 2 inputs predicted" in result.stderr
    assert _predicted_inputs(tmp / "loop_out") == {"val0.png", "val1.png"}
    (line,) = [w for w in _warnings(result) if "already listed" in w]
    assert f"{scans / 'val0_link.png'} (glob {scans}/**/*.png) = {scans / 'val0.png'}" in line
    assert "each predicted once" in line


# ------------------------------------------------------------------------------------------------ resume
def _resume_config(tmp: Path, config: dict, run_dir: Path, **changes: object) -> Path:
    return write_config(tmp / "resume.yaml", config, **{"experiment.resume": str(run_dir), **changes})


@case
def case_resume_from_truncated_checkpoint_changes_nothing(tmp: Path) -> None:
    run_dir, path, config = interrupted_run(tmp)
    latest = run_dir / "checkpoints" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:300])
    before = snapshot(run_dir)
    result = run_main(_resume_config(tmp, config, run_dir))
    assert result.rc == 1 and f"checkpoint error: cannot read checkpoint {latest}" in result.one_error()
    assert snapshot(run_dir) == before


@case
def case_resume_from_another_architecture_changes_nothing(tmp: Path) -> None:
    run_dir, path, config = interrupted_run(tmp)
    latest = run_dir / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    state["model"] = torch.load(_other_architecture_checkpoint(tmp), weights_only=True)["model"]
    torch.save(state, latest)
    before = snapshot(run_dir)
    result = run_main(_resume_config(tmp, config, run_dir))
    assert result.rc == 1 and f"'model' weights of {latest} does not fit AutoEncoder" in result.one_error()
    assert snapshot(run_dir) == before


@case
def case_resume_with_changed_network_refused(tmp: Path) -> None:
    run_dir, path, config = interrupted_run(tmp)
    before = snapshot(run_dir)
    result = run_main(_resume_config(tmp, config, run_dir, **{"model.params.channels": [8, 16]}))
    assert result.rc == 2 and "model.params.channels: [4, 8] -> [8, 16]" in result.one_error()
    assert snapshot(run_dir) == before


@case
def case_resume_with_changed_lr_refused(tmp: Path) -> None:
    run_dir, path, config = interrupted_run(tmp)
    before = snapshot(run_dir)
    result = run_main(_resume_config(tmp, config, run_dir), "--set", "trainer.params.optimizer.params.lr=2e-3")
    line = result.one_error()
    assert result.rc == 2 and "trainer.params.optimizer.params.lr: 0.001 -> 0.002" in line
    assert "start a new run" in line
    assert snapshot(run_dir) == before


@case
def case_resume_extends_training_and_records_the_event(tmp: Path) -> None:
    run_dir, path, config = interrupted_run(tmp)
    original_config = (run_dir / "config.yaml").read_bytes()
    started = manifest(run_dir)["started"]
    result = run_main(_resume_config(tmp, config, run_dir, **{"trainer.params.max_epochs": 3}))
    assert result.rc == 0, result.stderr
    record = manifest(run_dir)
    assert (run_dir / "config.yaml").read_bytes() == original_config and record["started"] == started
    assert record["status"] == "finished"
    assert [e["event"] for e in record["events"]] == ["running", "interrupted", "resumed", "running", "finished"]
    resumed = record["events"][2]
    assert resumed["from_step"] == 2 and resumed["changed"]["trainer.params.max_epochs"] == {"old": 2, "new": 3}
    assert history_steps(run_dir) == [1, 2, 3, 4, 5, 6]


@case
def case_resume_without_an_experiment_block(tmp: Path) -> None:
    config = base_config(tmp, make_data(tmp))
    del config["experiment"]  # as every method file: runs go to ./runs (the config's folder here)
    config["trainer"]["params"]["max_epochs"] = 2
    path = write_config(tmp / "method.yaml", config)
    assert interrupt_after_first_checkpoint(path).rc == 130
    run_dir = the_run(tmp)
    original_config = (run_dir / "config.yaml").read_bytes()
    result = run_main(path, "--set", f"experiment.resume={run_dir}")  # the command the interruption names
    assert result.rc == 0 and not result.errors, result.stderr
    assert (run_dir / "config.yaml").read_bytes() == original_config and history_steps(run_dir) == [1, 2, 3, 4]
    events = manifest(run_dir)["events"]
    assert [e["event"] for e in events] == ["running", "interrupted", "resumed", "running", "finished"]
    assert list(events[2]["changed"]) == ["overrides"]  # the --set list; experiment.resume itself is no change


@case
def case_resume_of_a_finished_run_refused(tmp: Path) -> None:
    run_dir, path, config = trained_run(tmp)
    before = snapshot(run_dir)
    result = run_main(_resume_config(tmp, config, run_dir, **{"trainer.params.max_epochs": 2}))
    line = result.one_error()
    assert result.rc == 2 and f"config error: experiment.resume: {run_dir} is a finished run" in line
    assert f"--set experiment.task=evaluate --set experiment.weights={run_dir}/checkpoints/best.pt" in line
    assert f"a new run from its weights, --set experiment.weights={run_dir}/checkpoints/latest.pt" in line
    assert snapshot(run_dir) == before


def _start_live_run(tmp: Path) -> tuple[subprocess.Popen, Path, dict]:
    """A training (3 epochs, a checkpoint every step) that sleeps after its first checkpoint, once it sleeps."""
    config = base_config(tmp, make_data(tmp))
    config["trainer"]["params"].update(max_epochs=3, checkpoint_every_steps=1)
    path = write_config(tmp / "live.yaml", config)
    proc = subprocess.Popen([*faults_cmd("--pause-after-checkpoint", "latest.pt"), "--config_path", str(path)],
                            cwd=tmp, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: bool(run_dirs(tmp)) and (run_dirs(tmp)[0] / "checkpoints" / "latest.pt").exists()
             and "heartbeat" in manifest(run_dirs(tmp)[0]), proc, "the first checkpoint")
    return proc, run_dirs(tmp)[0], config


@case
def case_resume_of_a_live_run_refused(tmp: Path) -> None:
    proc, run_dir, config = _start_live_run(tmp)
    try:
        result = run_main(_resume_config(tmp, config, run_dir))
        line = result.one_error()
        assert result.rc == 2 and f"config error: experiment.resume: {run_dir} is still running: process " in line
        assert f"process {proc.pid} on host {socket.gethostname()} is running" in line and "last heartbeat" in line
        report = _report(tmp, run_dir)
        assert f"skipping {run_dir}: the run is still running (process {proc.pid} on host" in report.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err  # the live run was untouched by the refused resume
    record = manifest(run_dir)
    assert [e["event"] for e in record["events"]] == ["running", "interrupted"] and history_steps(run_dir) == [1]


@case
def case_sigkilled_run_is_reported_died_and_resumed(tmp: Path) -> None:
    proc, run_dir, config = _start_live_run(tmp)
    proc.kill()  # SIGKILL: nothing can be recorded
    proc.communicate(timeout=120)
    assert manifest(run_dir)["status"] == "running"
    report = _report(tmp, run_dir)
    assert report.returncode == 1
    assert f"skipping {run_dir}: the run died (process {proc.pid} on host {socket.gethostname()} is gone; last " \
           "heartbeat " in report.stderr and "its manifest says 'running'" in report.stderr
    step = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"]
    result = run_main(_resume_config(tmp, config, run_dir, **{"trainer.params.max_steps": step + 2}))
    assert result.rc == 0 and not result.errors, result.stderr
    (warning,) = [w for w in _warnings(result) if "resuming" in w]
    assert f"resuming {run_dir}: died (process {proc.pid} on host" in warning
    record = manifest(run_dir)
    assert [e["event"] for e in record["events"]] == ["running", "died", "resumed", "running", "finished"]
    assert record["events"][1]["owner"]["pid"] == proc.pid and record["owner"]["pid"] != proc.pid
    assert history_steps(run_dir) == list(range(1, step + 3))


@case
def case_resume_of_a_run_owned_by_another_host(tmp: Path) -> None:
    run_dir, path, config = interrupted_run(tmp)
    record = manifest(run_dir)
    record.update(status="running", owner={**record["owner"], "host": "elsewhere"})  # a shared run folder
    (run_dir / "manifest.json").write_text(json.dumps(record))
    before = snapshot(run_dir)
    result = run_main(_resume_config(tmp, config, run_dir))
    line = result.one_error()
    assert result.rc == 2 and f"experiment.resume: {run_dir} says 'running', owned by process " in line
    assert "on host elsewhere, not this host" in line and "cannot be seen from here" in line
    assert "--set experiment.force_resume=true" in line and snapshot(run_dir) == before
    report = _report(tmp, run_dir)
    assert f"skipping {run_dir}: the run may still be running (process" in report.stderr
    result = run_main(_resume_config(tmp, config, run_dir, **{"experiment.force_resume": True}))
    assert result.rc == 0, result.stderr
    events = manifest(run_dir)["events"]
    assert [e["event"] for e in events][-4:] == ["owner_unverified", "resumed", "running", "finished"]
    assert events[-4]["owner"]["host"] == "elsewhere" and history_steps(run_dir) == [1, 2, 3, 4]


@case
def case_resume_with_offline_wandb_keeps_the_first_wandb_run(tmp: Path) -> None:
    from tests.wandb_reader import read_run

    data = make_data(tmp)
    config = base_config(tmp, data)
    config["wandb"]["mode"] = "offline"
    config["trainer"]["params"]["max_epochs"] = 2
    assert interrupt_after_first_checkpoint(write_config(tmp / "run.yaml", config), WANDB_MODE="").rc == 130
    run_dir = the_run(tmp)
    first = manifest(run_dir)["wandb"]
    first_files = snapshot(Path(first["dir"]))
    result = run_main(_resume_config(tmp, config, run_dir), WANDB_MODE="")
    assert result.rc == 0, result.stderr
    record = manifest(run_dir)
    assert record["wandb"] == first and snapshot(Path(first["dir"])) == first_files
    (second,) = record["wandb_resumed"]
    assert second["id"] == first["id"] and second["dir"] != first["dir"]
    steps = [row["trainer/step"] for row in read_run(Path(second["dir"]) / f"run-{second['id']}.wandb")["history"]
             if "train/loss" in row]
    assert steps == [3, 4]


@case
def case_sigint_then_resume_never_duplicates_history(tmp: Path) -> None:
    data = make_data(tmp, n_train=16)
    config = base_config(tmp, data)
    params = config["trainer"]["params"]
    params.update(max_epochs=500, checkpoint_every_steps=3, val_interval=1000)
    config["data"]["params"]["batch_size"] = 2
    path = write_config(tmp / "long.yaml", config)
    proc = start_main(path)
    # latest.pt is written every 3 steps and at every epoch end (8 batches of 2): wait for a logged step that is
    # neither, so rows after the last checkpoint exist when the signal lands
    wait_for(lambda: bool(run_dirs(tmp)) and (run_dirs(tmp)[0] / "checkpoints" / "latest.pt").exists()
             and len(history_steps(run_dirs(tmp)[0])) >= 5 and history_steps(run_dirs(tmp)[0])[-1] % 3 != 0
             and history_steps(run_dirs(tmp)[0])[-1] % 8 != 0,
             proc, "a checkpoint and steps after it")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    run_dir = the_run(tmp)
    assert manifest(run_dir)["status"] == "interrupted" and "SIGINT" in manifest(run_dir)["error"]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "metrics.partial.json").exists()
    logged = history_steps(run_dir)
    ckpt_step = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["step"]
    assert logged[-1] > ckpt_step  # rows after the checkpoint exist: the resume must not repeat them
    original_config = (run_dir / "config.yaml").read_bytes()
    stop = ckpt_step + 4
    result = run_main(_resume_config(tmp, config, run_dir, **{"trainer.params.max_steps": stop}))
    assert result.rc == 0, result.stderr
    steps = history_steps(run_dir)
    assert steps == list(range(1, stop + 1))
    superseded = [json.loads(line) for line in (run_dir / "history.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded if "train/loss" in r] == [s for s in logged if s > ckpt_step]
    assert (run_dir / "config.yaml").read_bytes() == original_config
    assert [e["event"] for e in manifest(run_dir)["events"]] == [
        "running", "interrupted", "resumed", "running", "finished"]


@case
def case_sigterm_marks_the_run_interrupted(tmp: Path) -> None:
    data = make_data(tmp)
    config = base_config(tmp, data)
    config["trainer"]["params"]["max_epochs"] = 1000
    proc = start_main(write_config(tmp / "long.yaml", config))
    wait_for(lambda: bool(run_dirs(tmp)) and (run_dirs(tmp)[0] / "history.jsonl").exists(), proc, "training")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    run_dir = the_run(tmp)
    assert (f"interrupted by SIGTERM; {run_dir / 'manifest.json'} says 'interrupted' (resume with "
            f"--set experiment.resume={run_dir})") in err and "Traceback" not in err
    assert manifest(run_dir)["status"] == "interrupted" and not (run_dir / "metrics.json").exists()


@case
def case_interrupt_while_loading_names_no_run_folder(tmp: Path) -> None:
    path = _config(tmp)
    marker = tmp / "loading"
    proc = subprocess.Popen([sys.executable, "-m", "tests.reliability._faults", "--slow-loading", str(marker), "--",
                             "--config_path", str(path)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(marker.exists, proc, "the config load")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "interrupted by SIGINT; no run folder had been created, nothing was written" in errors[0]
    assert "manifest" not in err
    _no_run_folder(tmp)


# ------------------------------------------------------------------------------------------------ lifecycle
@case
def case_finished_run_has_status_and_metrics(tmp: Path) -> None:
    run_dir, _, _ = trained_run(tmp)
    record = manifest(run_dir)
    assert record["status"] == "finished" and "error" not in record
    assert [e["event"] for e in record["events"]] == ["running", "finished"]
    assert (run_dir / "metrics.json").exists() and not (run_dir / "metrics.partial.json").exists()
    assert "train/loss" in json.loads((run_dir / "metrics.json").read_text())


@case
def case_non_finite_loss_without_checkpoint(tmp: Path) -> None:
    path = _config(tmp, model={"module_name": "tests.reliability._faults", "class_name": "NaNAfterAE",
                               "params": {"nan_after": 0}})
    result = run_main(path)
    line = result.one_error()
    assert result.rc == 1 and "training error: non-finite training loss at step 1" in line
    assert "no checkpoint had been written before it" in line and "untouched" not in line
    run_dir = _failed_run(tmp, "non-finite training loss at step 1")
    assert not (run_dir / "checkpoints" / "latest.pt").exists()


@case
def case_non_finite_loss_keeps_the_last_checkpoint(tmp: Path) -> None:
    data = make_data(tmp, n_train=16)
    config = base_config(tmp, data)
    config["model"] = {"module_name": "tests.reliability._faults", "class_name": "NaNAfterAE",
                       "params": {"nan_after": 3}}
    config["trainer"]["params"].update(checkpoint_every_steps=2)
    result = run_main(write_config(tmp / "run.yaml", config))
    line = result.one_error()
    run_dir = the_run(tmp)
    latest = run_dir / "checkpoints" / "latest.pt"
    assert result.rc == 1 and "non-finite training loss at step 4" in line
    assert f"the last checkpoint written before it ({latest}) is untouched" in line
    assert torch.load(latest, weights_only=True)["step"] == 2
    _failed_run(tmp, "step 4")


@case
def case_unwritable_output_folder(tmp: Path) -> None:
    blocker = tmp / "a_file"
    blocker.write_text("")
    result = run_main(_config(tmp, **{"experiment.output_dir": str(blocker / "runs")}))
    line = result.one_error()
    assert result.rc == 1 and "output error: cannot create the run folder under experiment.output_dir" in line
    assert str(blocker) in line


@case
def case_permission_denied_output_folder(tmp: Path) -> None:
    target = Path("/sys/uad_runs")  # sysfs: not writable even for root
    result = run_main(_config(tmp, **{"experiment.output_dir": str(target)}))
    line = result.one_error()
    assert result.rc == 1 and "output error: cannot create the run folder" in line and str(target) in line


@case
def case_disk_full_while_writing_a_checkpoint(tmp: Path) -> None:
    path = _config(tmp, **{"trainer.params.checkpoint_every_steps": 1})
    result = run([*faults_cmd("--enospc-checkpoint", "latest.pt", "--after", "1"), "--config_path", str(path)], REPO)
    line = result.one_error()
    run_dir = the_run(tmp)
    latest = run_dir / "checkpoints" / "latest.pt"
    assert result.rc == 1 and f"output error: disk full while writing {latest}: No space left on device" in line
    assert torch.load(latest, weights_only=True)["step"] == 1  # the checkpoint before the full disk is intact
    assert sorted(p.name for p in latest.parent.iterdir()) == ["latest.pt"]  # no half-written temporary file
    _failed_run(tmp, str(latest))


@case
def case_disk_full_while_logging(tmp: Path) -> None:
    path = _config(tmp)
    cmd = [sys.executable, "-m", "tests.reliability._faults", "--enospc", "history.jsonl", "--",
           "--config_path", str(path)]
    result = run(cmd, REPO)
    line = result.one_error()
    assert result.rc == 1 and "output error: disk full while writing" in line and "history.jsonl" in line
    _failed_run(tmp, "history.jsonl")


# ------------------------------------------------------------------------------------------------ tools
def _report(tmp: Path, *folders: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.report", *map(str, folders), "--out", str(tmp / "report")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=240, check=False)


def _fake_eval_metrics(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.update({"eval/rqi/healthy/rqi": 0.8, "eval/ahi/all_pathological/ahi": 0.5,
                    "eval/caci/all_annotated/caci": 0.4})
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


@case
def case_report_skips_unfinished_runs(tmp: Path) -> None:
    run_dir, path, config = trained_run(tmp)
    _fake_eval_metrics(run_dir)
    broken = _config(tmp / "own")
    (tmp / "own" / "data" / "val1.png").write_bytes(b"broken")
    assert run_main(broken).rc == 1
    failed = the_run(tmp / "own")
    stray = tmp / "notes.txt"
    stray.write_text("not a run")
    done = _report(tmp, run_dir, failed, stray)
    assert done.returncode == 0, done.stderr
    assert f"skipping {failed}: the run did not finish (status 'failed': DataReadError:" in done.stderr
    assert f"skipping {stray}: not a folder" in done.stderr
    table = (tmp / "report" / "comparison.md").read_text()
    assert "| tiny |" in table and table.count("| tiny") == 1


@case
def case_report_without_finished_runs(tmp: Path) -> None:
    path = _config(tmp, model={"module_name": "tests.reliability._faults", "class_name": "NaNAfterAE",
                               "params": {"nan_after": 0}})
    assert run_main(path).rc == 1
    done = _report(tmp, the_run(tmp))
    assert done.returncode == 1 and "none of the 1 folder(s) is a finished run" in done.stderr
    assert "Traceback" not in done.stderr


@case
def case_report_over_an_interrupted_copy(tmp: Path) -> None:
    run_dir, _, _ = trained_run(tmp)
    _fake_eval_metrics(run_dir)
    copy = tmp / "copy"
    shutil.copytree(run_dir, copy)
    record = manifest(copy)
    record.update(status="interrupted", error="interrupted by SIGTERM")
    (copy / "manifest.json").write_text(json.dumps(record))
    done = _report(tmp, run_dir, copy)
    assert done.returncode == 0 and f"skipping {copy}: the run did not finish (status 'interrupted'" in done.stderr


_LOCK_HOLDER = ("import sys, time; from pathlib import Path; from tools.study.runner import lock_study; "
                "lock = lock_study(Path(sys.argv[1])); print('held', flush=True); time.sleep(float(sys.argv[2]))")


def _lock_holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(folder), str(seconds)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@case
def case_one_study_process_per_study_folder(tmp: Path) -> None:
    method = _config(tmp)
    study = tmp / "study.yaml"
    study.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp / 'runs'}\nmethods:\n  - {{config: {method}}}\n")
    folder = tmp / "runs" / "exp" / "_studies" / "s"
    command = [sys.executable, "-m", "tools.study", str(study), "--report-only", "--no-wandb"]
    holder = _lock_holder(folder, 120)
    try:
        result = run(command, REPO)
        line = result.one_error()
        assert result.rc == 1 and f"study error: {folder} is in use by tools.study process {holder.pid} on " in line
        assert "--wait" in line and not (folder / "study.md").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    result = run(command, REPO)
    assert result.rc == 0 and (folder / "study.md").exists(), result.stderr
    (folder / "study.md").unlink()
    holder = _lock_holder(folder, 120)
    log = tmp / "waiting.log"
    with log.open("w") as stderr:
        waiting = subprocess.Popen([*command, "--wait"], cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                   stderr=stderr, text=True)
        wait_for(lambda: f"waiting for tools.study process {holder.pid} on host" in log.read_text(), waiting,
                 "the second study to wait for the lock")
        assert waiting.poll() is None and not (folder / "study.md").exists()
        holder.kill()
        holder.wait()
        assert waiting.wait(timeout=TIMEOUT_S) == 0, log.read_text()
    assert (folder / "study.md").exists()


@pytest.mark.parametrize("name", list(CASES))
def test_reliability(name: str, outcomes: dict) -> None:
    outcomes[name].result(timeout=900)
