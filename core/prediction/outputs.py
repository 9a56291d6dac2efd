"""What a prediction run writes per input: maps, binary masks, overlays and rows of ``scores.csv``.

- NIfTI inputs (2-D or 3-D): ``<stem>_anomaly_map.nii.gz`` (float32) and ``<stem>_mask_<threshold>.nii.gz``
  (uint8, ``map > value``) with the input's shape, affine and header; slices that were not scored are 0.
- 2-D files: ``<stem>_anomaly_map.npy`` (float32 [H,W]) and ``<stem>_mask_<threshold>.png`` (0/255).
- Overlays ``<stem>_overlay_slice<k>.png`` of the highest-scoring slices: the input (left) and the input with
  the map in a heat colour, supra-threshold pixels of the first threshold tinted cyan (right).
- ``predict.format: mood``: ``mood/pixel/<stem>.nii.gz`` (float32 voxel scores in [0, 1], the input's shape and
  affine, 0 in slices outside ``axial_range`` and outside the brain mask) and ``mood/sample/<stem>.nii.gz.txt``
  (one sample score in [0, 1]), the layout of the MOOD challenge's pixel- and sample-level tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.prediction.inference import SliceMaps
from core.prediction.scans import Scan, nifti_like, volume_from_slices
from core.prediction.thresholds import Threshold

if TYPE_CHECKING:
    from core.evaluation.thresholds import ScoreCalibration

logger = logging.getLogger(__name__)


def write_maps(scan: Scan, result: SliceMaps, thresholds: list[Threshold], out_dir: Path, stem: str) -> list[Path]:
    """Write the anomaly map and one binary mask per threshold; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if scan.kind == "nifti":
        import nibabel as nib

        volume = volume_from_slices(scan, result.maps)
        path = out_dir / f"{stem}_anomaly_map.nii.gz"
        nib.save(nifti_like(scan, volume, np.float32), str(path))
        written.append(path)
        for th in thresholds:
            path = out_dir / f"{stem}_mask_{th.name}.nii.gz"
            nib.save(nifti_like(scan, volume > th.value, np.uint8), str(path))
            written.append(path)
        return written
    from PIL import Image

    path = out_dir / f"{stem}_anomaly_map.npy"
    np.save(path, result.maps[0])
    written.append(path)
    for th in thresholds:
        path = out_dir / f"{stem}_mask_{th.name}.png"
        Image.fromarray(((result.maps[0] > th.value) * 255).astype(np.uint8)).save(path)
        written.append(path)
    return written


def write_mood(scan: Scan, result: SliceMaps, row: dict[str, Any], calibration: ScoreCalibration, out_dir: Path,
               stem: str) -> list[Path]:
    """The MOOD files of one NIfTI input (see the module docstring); ``row`` is its scan row of ``scores.csv``."""
    import nibabel as nib

    from core.prediction.calibrated import unit_sample, unit_volume

    pixel, sample = out_dir / "mood" / "pixel", out_dir / "mood" / "sample"
    pixel.mkdir(parents=True, exist_ok=True)
    sample.mkdir(parents=True, exist_ok=True)
    volume = volume_from_slices(scan, unit_volume(calibration, result.maps, scan.brain))
    paths = [pixel / f"{stem}.nii.gz", sample / f"{stem}.nii.gz.txt"]
    nib.save(nifti_like(scan, volume, np.float32), str(paths[0]))
    paths[1].write_text(f"{unit_sample(calibration, row):.9g}\n")
    return paths


def score_rows(scan: Scan, result: SliceMaps, thresholds: list[Threshold], stem: str) -> list[dict[str, Any]]:
    """One row per slice, plus one per volume (score = its highest slice score) for 3-D inputs.

    Columns: ``input``, ``output``, ``kind`` ('image', 'slice' or 'volume'), ``slice`` (canonical axial index),
    ``score``, ``score_mean`` (volume rows: mean slice score; empty elsewhere), and per threshold
    ``above_<name>`` (pixels with map > value) and ``exceeds_<name>`` (1 when any pixel does).
    """
    rows = []
    kind = "image" if scan.kind == "image" or scan.n_axial == 1 else "slice"
    for i, k in enumerate(scan.indices):
        row: dict[str, Any] = {"input": str(scan.path), "output": stem, "kind": kind, "slice": k,
                               "score": float(result.scores[i]), "score_mean": None}
        for th in thresholds:
            above = int((result.maps[i] > th.value).sum())
            row[f"above_{th.name}"], row[f"exceeds_{th.name}"] = above, int(above > 0)
        rows.append(row)
    if kind == "slice":
        row = {"input": str(scan.path), "output": stem, "kind": "volume", "slice": None,
               "score": float(result.scores.max()), "score_mean": float(result.scores.mean())}
        for th in thresholds:
            above = sum(r[f"above_{th.name}"] for r in rows)
            row[f"above_{th.name}"], row[f"exceeds_{th.name}"] = above, int(above > 0)
        rows.append(row)
    return rows


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """Input | input with heat map, as RGB [H, 2W+2, 3] in [0,1].

    Args:
        image: [H,W] raw slice (min-max scaled for display).
        anomaly_map: [H,W] >= 0 on the same grid.
        threshold: pixels with map > threshold are tinted cyan; None draws no mask.
    """
    from matplotlib import colormaps

    low, high = float(image.min()), float(image.max())
    grey = (image - low) / (high - low) if high > low else np.zeros_like(image)
    base = np.repeat(grey[..., None], 3, axis=-1)
    top = float(np.percentile(anomaly_map, 99.5)) if anomaly_map.any() else 1.0
    heat = np.clip(anomaly_map / max(top, 1e-8), 0.0, 1.0)
    alpha = 0.7 * heat[..., None]
    blended = base * (1.0 - alpha) + colormaps["inferno"](heat)[..., :3] * alpha
    if threshold is not None:
        blended[anomaly_map > threshold] = 0.5 * blended[anomaly_map > threshold] + 0.5 * np.array([0.0, 1.0, 1.0])
    gap = np.ones((image.shape[0], 2, 3))
    return np.concatenate([base, gap, blended], axis=1).clip(0.0, 1.0)


def top_slices(result: SliceMaps, n: int) -> list[int]:
    """Positions (into the scan's slices) of the ``n`` highest scores, highest first."""
    return [int(i) for i in np.argsort(-result.scores, kind="stable")[:n]]


def write_overlays(scan: Scan, result: SliceMaps, thresholds: list[Threshold], out_dir: Path, stem: str, *,
                   n: int, log: Any) -> list[Path]:
    """Overlays of the ``n`` highest-scoring slices (2-D inputs: their one slice), saved and logged as images."""
    from PIL import Image

    written = []
    threshold = thresholds[0].value if thresholds else None
    for i in top_slices(result, n):
        rgb = overlay(scan.slices[i], result.maps[i], threshold)
        name = f"{stem}_overlay" + (f"_slice{scan.indices[i]}" if scan.n_axial > 1 else "")
        path = out_dir / f"{name}.png"
        Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8)).save(path)
        log.log_image(f"predict/{name}", rgb)
        written.append(path)
    return written
