"""``experiment.task: predict``: apply trained weights to new scans (see :mod:`core.prediction`)."""

from __future__ import annotations

import csv
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from core.Configurator import ConfigError, build, check_imports, check_value_bounds
from core.evaluation.runner import require_scorer
from core.evaluation.thresholds import MaskCalibration, ScoreCalibration, describe_mask_threshold
from core.prediction.calibrated import (
    Flags,
    add_p_values,
    check_mood_inputs,
    intensity_flags,
    load_calibration,
)
from core.prediction.inference import Preprocessing, predict_scan
from core.prediction.output_folder import OutputFolder, check_output_folder
from core.prediction.outputs import score_rows, write_maps, write_mood, write_overlays
from core.prediction.scans import expand, output_stem, read_scan
from core.prediction.settings import PredictSettings, parse_predict
from core.prediction.thresholds import Threshold, select_thresholds
from data.dataset import resolve
from dl_utils.errors import DataError, RunInterrupted
from dl_utils.run import Run

if TYPE_CHECKING:
    from model_zoo.base import AnomalyModel

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TARGET_SIZE = (128, 128)  # DataModule's defaults, for a checkpoint config that does not set them
DEFAULT_INTENSITY = "minmax"


def preprocessing_of(stored: dict[str, Any] | None, fallback: dict[str, Any], intensity: str | None) -> Preprocessing:
    """The training run's slice preprocessing, from the checkpoint's config (the given config if it has none)."""
    source = stored if isinstance(stored, dict) and "data" in stored else fallback
    if source is fallback:
        logger.warning("predict: the checkpoint stores no config; preprocessing from the given config's data block")
    params = (source.get("data") or {}).get("params") or {}
    size = params.get("target_size", DEFAULT_TARGET_SIZE)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ConfigError(f"data.params.target_size of the checkpoint's config: expected two positive integers, "
                          f"got {size!r}")
    return Preprocessing(target_size=(int(size[0]), int(size[1])),
                         intensity=intensity or params.get("intensity", DEFAULT_INTENSITY))


def _pairs(settings: PredictSettings) -> list[tuple[Path, Path | None, str]]:
    inputs = expand(settings.inputs, "inputs", REPO_ROOT)
    if settings.masks is None:
        return _each_file_once([(path, None, where) for path, where in inputs])
    masks = expand(settings.masks, "masks", REPO_ROOT)
    if len(masks) != len(inputs):
        raise ConfigError(f"predict.masks: {len(masks)} mask files for {len(inputs)} inputs; masks are paired with "
                          "the inputs in order (same folders sorted by name, or row-aligned CSVs)")
    return _each_file_once([(path, mask, where) for (path, where), (mask, _) in zip(inputs, masks, strict=True)])


def _identity(path: Path) -> tuple[int, int] | str:
    try:
        stat = path.stat()
    except OSError:  # missing: reported as a bad input when it is read
        return str(path)
    return stat.st_dev, stat.st_ino


def _each_file_once(pairs: list[tuple[Path, Path | None, str]]) -> list[tuple[Path, Path | None, str]]:
    """Drop an input that is a file already listed (a repeated CSV row, a second link to it); the first counts."""
    first: dict[tuple[int, int] | str, tuple[Path, str]] = {}
    kept, repeated = [], []
    for path, mask, where in pairs:
        key = _identity(path)
        if key in first:
            repeated.append(f"{path} ({where}) = {first[key][0]} ({first[key][1]})")
            continue
        first[key] = (path, where)
        kept.append((path, mask, where))
    if repeated:
        logger.warning("predict: %d inputs are files already listed, each predicted once: %s", len(repeated),
                       "; ".join(repeated[:3]) + ("; ..." if len(repeated) > 3 else ""))
    return kept


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())  # a library's multi-line message (pydicom lists its plugins) on one line


def _unique(stem: str, used: set[str]) -> str:
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _mask_calibration(model: AnomalyModel, weights: Path) -> MaskCalibration | None:
    """The training run's calibrated mask threshold (AutoDDPM ``tau: calibrated``), if the model needs one
    (:attr:`~model_zoo.base.MaskThresholdModel.needs_mask_threshold`); it is passed to every ``get_anomaly`` call.

    Raises:
        ConfigError: the model needs it and ``mask_threshold.json`` is not next to the weights.
    """
    from model_zoo.base import MaskThresholdModel

    if not (isinstance(model, MaskThresholdModel) and model.needs_mask_threshold):
        return None
    path = weights.parent / MaskCalibration.FILE_NAME
    if not path.is_file():
        raise ConfigError(f"experiment.weights: the model has model.params.tau: calibrated but {path} is missing; "
                          "evaluate the weights with the mask_calibration task first, or set a fixed tau")
    calibration = MaskCalibration.load(path)
    logger.info("predict: mask threshold tau = %g from %s", calibration.value, path)
    return calibration


def run_prediction(config: dict[str, Any], *, experiment: Any, wandb_settings: Any, name: str, config_path: str,
                   dry_run: bool = False) -> int:
    """Validate the ``predict:`` block, run the model on every input, write and log the results.

    Args:
        config: the resolved config; experiment, wandb_settings: its validated sections (``core.Main``).
        name: the config's run name; the run folder is ``<output_dir>/<experiment>/<name>_predict/<timestamp>``.
        config_path: the YAML given on the command line (for the manifest).
        dry_run: validate, find the inputs and build the model, then return without reading any scan.

    Returns:
        0, or 1 when an input was bad and ``on_error`` is ``'stop'``.

    Raises:
        ConfigError: naming the YAML path for a bad ``predict:`` block, inputs that match nothing, missing
            thresholds or a checkpoint whose config does not build.
    """
    from dl_utils.checkpoint import load_checkpoint, load_model_weights
    from dl_utils.distributed import init_distributed
    from model_zoo.base import MaskThresholdModel, TrainableModel

    settings = parse_predict(config.get("predict"))
    weights = Path(experiment.weights)
    stored = load_checkpoint(weights).get("config")
    if stored is not None:  # data from elsewhere: bounded, and nothing it names is imported unchecked
        check_value_bounds(stored, f"experiment.weights: the config stored in {weights}")
    prep = preprocessing_of(stored, config, settings.intensity)
    model_block = config["model"]
    if isinstance(stored, dict) and "model" in stored:
        model_block = stored["model"]
        check_imports(model_block, f"experiment.weights: the config stored in {weights}: model")
    if model_block != config.get("model"):
        logger.warning("predict: the model block of %s's stored config differs from the given config's; "
                       "using the stored one", weights)
    thresholds = select_thresholds(settings, weights, REPO_ROOT)
    pairs = _pairs(settings)
    check_mood_inputs(settings, [path for path, _, _ in pairs])
    scores_calibration = load_calibration(settings, weights, REPO_ROOT)
    model = require_scorer(build(model_block, "model", base=TrainableModel),
                           f"experiment.task 'predict' needs a model that scores anomalies (model block of {weights})")
    calibration = _mask_calibration(model, weights)
    chosen_dir = resolve(settings.output_dir, REPO_ROOT) if settings.output_dir else None
    if chosen_dir is not None:
        check_output_folder(chosen_dir, overwrite=settings.overwrite, inputs=[path for path, _, _ in pairs])
    logger.info("predict: %d inputs, slices at %s with intensity %r", len(pairs), prep.target_size, prep.intensity)
    if dry_run:
        logger.info("predict dry run OK: %s", config_path)
        return 0

    dist = init_distributed(experiment.device)
    if dist.world_size > 1:
        raise ConfigError("experiment.task: 'predict' runs in one process; start it without torchrun")
    name = f"{name}_predict"  # prediction runs never mix with the training runs of the same config
    run = Run.create(output_dir=experiment.output_dir, experiment=experiment.name, name=name, device=dist.device,
                     seed=experiment.seed, config=config)
    with run.recording(task="predict"):
        run.start(config_path=config_path, task="predict", weights=experiment.weights)
        outputs = OutputFolder(chosen_dir or run.run_dir / "predictions", run_dir=run.run_dir)
        run.open_logger(mode=wandb_settings.mode, project=wandb_settings.project or experiment.name,
                        name=f"{name}/{run.run_dir.name}", entity=wandb_settings.entity,
                        group=wandb_settings.group or name, job_type=wandb_settings.job_type,
                        tags=wandb_settings.tags, notes=wandb_settings.notes)
        try:
            loaded = load_model_weights(model, weights)
            model = model.to(dist.device).eval()
            if calibration is not None:
                run.update_manifest(predict_mask_threshold=calibration.to_json())
            exit_code = predict_all(model, pairs, settings, thresholds, prep, outputs=outputs, run=run,
                                    calibration=scores_calibration,
                                    mask_threshold=None if calibration is None else calibration.value)
            label = model.inference_label()
            mask = {"mask_threshold": describe_mask_threshold(model, calibration)} \
                if isinstance(model, MaskThresholdModel) else {}
            run.update_manifest(predict_model={**{k: str(v) for k, v in model.provenance().items()},
                                               **({"inference": str(label)} if label else {}), **mask})
            run.update_manifest(predict_weights={"path": str(weights), "which": loaded},
                                predict_output=str(outputs.path), predict_thresholds=[asdict(t) for t in thresholds],
                                predict_preprocessing={"target_size": list(prep.target_size),
                                                       "intensity": prep.intensity})
        except RunInterrupted as err:
            err.outcome = (f"the prediction in {run.run_dir} stopped early (outputs written so far are in "
                           f"{outputs.path})")
            raise
        if exit_code != 0:
            run.fail("predict: stopped at a bad input or predicted no input (see the log and skipped.csv)")
    logger.info("predict: run folder %s, outputs in %s", run.run_dir, outputs.path)
    return exit_code


def predict_all(model: torch.nn.Module, pairs: list[tuple[Path, Path | None, str]], settings: PredictSettings,
                thresholds: list[Threshold], prep: Preprocessing, *, outputs: OutputFolder, run: Run,
                calibration: ScoreCalibration | None = None, mask_threshold: float | None = None) -> int:
    """Predict on every (input, mask, source); write maps, ``scores.csv`` and the summary.

    ``mask_threshold``: the training run's calibrated mask threshold, passed to every ``get_anomaly`` call (a
    model with ``tau: calibrated``), else None.

    With a healthy ``calibration`` every row gets its p- and q-value and FDR flag, each scan row its intensity
    check (:mod:`core.prediction.calibrated`), and ``format: mood`` writes the MOOD files.

    The per-input boundary is reading and preprocessing: a :class:`~dl_utils.errors.DataError` there (a
    :class:`BadInput` or a :class:`~data.readers.DataReadError`, which also stands for anything a format library
    raised on the file) makes the input a skipped one, or ends the loop with ``on_error: stop``. Any other
    exception (the model, our own code, writing the outputs) ends the run: it is not the input's fault.

    Returns:
        The exit code: 1 when the loop stopped at a bad input or no input was predicted, else 0.
    """
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    used: set[str] = set()
    predicted, stopped = 0, False
    shifted: list[dict[str, str]] = []
    start = time.perf_counter()
    progress = tqdm(pairs, desc="predict", disable=not sys.stderr.isatty(), leave=False)
    for path, mask, source in progress:
        try:
            scan = read_scan(path, mask, axial_range=settings.axial_range, source=source)
            result = predict_scan(model, scan, prep, device=run.device, batch_size=settings.batch_size,
                                  seed=run.seed, mask_threshold=mask_threshold)
        except DataError as err:
            skipped.append({"input": str(path), "reason": _one_line(err)})
            if settings.on_error == "stop":
                logger.error("predict: bad input, stopping: %s", _one_line(err))
                stopped = True
                break
            logger.warning("predict: bad input, skipped: %s", _one_line(err))
            continue
        stem = _unique(output_stem(path), used)
        outputs.record(write_maps(scan, result, thresholds, outputs.path, stem))
        outputs.record(write_overlays(scan, result, thresholds, outputs.path, stem, n=settings.n_overlays,
                                      log=run.logger))
        scan_rows = score_rows(scan, result, thresholds, stem)
        if calibration is not None:
            _calibrated_columns(scan_rows, scan, result.scores, result.inputs, calibration, shifted)
            if settings.format == "mood":
                outputs.record(write_mood(scan, result, scan_rows[-1], calibration, outputs.path, stem))
        rows.extend(scan_rows)
        predicted += 1
    flags = None if calibration is None or not rows else add_p_values(rows, calibration, fdr=settings.fdr,
                                                                      healthy=settings.healthy)
    for name, table in (("scores", rows), ("skipped", skipped)):
        if table:
            _write_csv(outputs.path / f"{name}.csv", table)
            outputs.record([outputs.path / f"{name}.csv"])
            run.logger.log_table(f"predict/{name}", table)
    run.logger.log_scalars({"predict/n_inputs": len(pairs), "predict/n_predicted": predicted,
                     "predict/n_skipped": len(skipped)})
    run.update_manifest(predict_skipped=skipped, predict_counts={"inputs": len(pairs), "predicted": predicted,
                                                                 "skipped": len(skipped)})
    if calibration is not None:
        run.update_manifest(predict_calibration=_calibration_record(calibration, flags, shifted, settings))
        if flags is not None:
            run.logger.log_scalars({"predict/n_flagged": flags.n_flagged})
    return _summarise(len(pairs), predicted, skipped, stopped, time.perf_counter() - start, outputs.path)


def _calibrated_columns(scan_rows: list[dict[str, Any]], scan: Any, scores: Any, inputs: Any,
                        calibration: ScoreCalibration, shifted: list[dict[str, str]]) -> None:
    """A volume row's ``subject_score`` (by the calibration's rule) and the scan row's ``intensity_check``."""
    row = scan_rows[-1]  # the scan's own row: its volume row, or the one row of a 2-D input
    if row["kind"] == "volume":
        row["subject_score"] = calibration.subject_score(scores)  # as its calibration subjects were
    flags = intensity_flags(calibration, inputs)
    row["intensity_check"] = flags or "ok"
    if flags:
        shifted.append({"input": str(scan.path), "flags": flags})
        logger.warning("predict: %s does not look like the training data after preprocessing (%s): another "
                       "contrast, intensity range or scaling rule? Its scores and p-values may mean nothing",
                       scan.path, flags)


def _calibration_record(calibration: ScoreCalibration, flags: Flags | None, shifted: list[dict[str, str]],
                        settings: PredictSettings) -> dict[str, Any]:
    return {"source": calibration.source, "dataset": calibration.dataset,
            "n_images": len(calibration.image_scores), "n_subjects": len(calibration.subject_scores),
            "aggregation": calibration.rule, "healthy_inputs": settings.healthy, "format": settings.format,
            "intensity_flagged": shifted, **({} if flags is None else flags.to_json())}


def _summarise(n_inputs: int, predicted: int, skipped: list[dict[str, str]], stopped: bool, seconds: float,
               out_dir: Path) -> int:
    """Log the one summary line (predicted and skipped inputs, why a run failed); return the exit code."""
    summary = f"predict: {predicted} of {n_inputs} inputs predicted in {seconds:.1f} s, {len(skipped)} skipped"
    if skipped:
        summary += ": " + "; ".join(s["input"] for s in skipped)
    if stopped:
        untried = n_inputs - predicted - len(skipped)
        logger.warning("%s (stopped at the first bad input, predict.on_error: stop; %d not tried)", summary, untried)
        return 1
    if predicted == 0:
        logger.error("%s; no input was predicted, so the prediction failed: each input's reason is on its own line "
                     "above and in %s", summary, out_dir / "skipped.csv")
        return 1
    logger.log(logging.WARNING if skipped else logging.INFO, summary)
    return 0
