"""Evaluation after training: a registry of small task functions, one runner, thresholds as data.

YAML::

    downstream_tasks:
      thresholds:   {module_name: core.DownstreamEvaluator, class_name: DownstreamEvaluator,
                     params: {task: thresholding, dataset: val, fprs: [0.01, 0.02, 0.05]}}
      segmentation: {module_name: core.DownstreamEvaluator, class_name: DownstreamEvaluator, enabled: true,
                     params: {task: segmentation, datasets: [atlas], fpr: 0.05}}

Each block is built with :func:`core.Configurator.build` into a :class:`DownstreamEvaluator`: ``task`` must be
a registered task (:data:`TASKS`), every other param must be an option of that task's function (checked
against its signature and annotations). :func:`run_downstream` runs every enabled block: model inference
happens **once per dataset** (cached, never augmented: data comes from ``data.eval_dataloader``), the
``thresholding`` tasks run first and write ``checkpoints/thresholds.json`` (with provenance), later tasks read
it unless their YAML gives ``threshold``. Results go to the logger (``eval/<block>/<dataset>/<metric>``,
figures, tables, manifest) and to ``report.md`` in the run folder.

Registered tasks (options in their docstrings): thresholding, detection, segmentation, localization, rqi,
ahi, caci. Oracle numbers (best Dice over thresholds chosen on labelled test data) carry the ``oracle_``
prefix and are upper bounds, not results.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from core.Configurator import ConfigError, build, is_enabled, type_problem
from dl_utils import visualization as vis
from optim.metrics import classification, distribution, localization, normative, segmentation

logger = logging.getLogger(__name__)

THRESHOLDS_FILE = "thresholds.json"
TaskFunction = Callable[..., "TaskResult"]
TASKS: dict[str, TaskFunction] = {}
PerceptualBackend = Literal["auto", "lpips", "stlpips", "random"]
InceptionBackend = Literal["auto", "torchvision", "pytorch_fid", "fid_helper", "random"]


def register_task(name: str) -> Callable[[TaskFunction], TaskFunction]:
    """Decorator adding a task function ``fn(ctx, **options) -> TaskResult`` to :data:`TASKS`."""
    def add(fn: TaskFunction) -> TaskFunction:
        if name in TASKS:
            raise ValueError(f"evaluation task {name!r} is registered twice")
        TASKS[name] = fn
        return fn

    return add


def fpr_tag(fpr: float) -> str:
    """0.05 -> 'fpr5pct' (metric-key friendly)."""
    return f"fpr{fpr * 100:g}pct"


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Inference:
    """One dataset's images and the model's outputs, on the CPU; tensors [N,1,H,W] unless stated.

    Attributes:
        name: dataset name; info: its ``data.dataset_info`` (None for 'train'/'val' if the module has none).
        image: inputs in [0,1]; anomaly_map: >= 0; anomaly_score: [N]; reconstruction: in [0,1] or None;
        anomaly_mask, brain_mask: {0,1} or None; label: [N] long; path: N source paths.
    """

    name: str
    image: Tensor
    anomaly_map: Tensor | None
    anomaly_score: Tensor | None
    reconstruction: Tensor | None
    anomaly_mask: Tensor | None
    brain_mask: Tensor | None
    label: Tensor
    path: list[str]
    info: Any = None

    def __len__(self) -> int:
        return self.image.shape[0]

    @property
    def healthy_tissue(self) -> Tensor:
        """Brain (or healthy-tissue) mask minus the anomaly mask; without a brain mask: everything but the anomaly."""
        base = self.brain_mask if self.brain_mask is not None else torch.ones_like(self.image)
        return base if self.anomaly_mask is None else base * (1.0 - self.anomaly_mask)


@dataclass
class TaskResult:
    """What a task returns: metrics per dataset (floats), figures, tables, provenance and report notes."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    if not parts or any(p is None for p in parts):
        return None
    return torch.cat(parts)  # type: ignore[arg-type]


class EvalContext:
    """What tasks use: cached inference per dataset, thresholds, perceptual and Inception networks.

    Args:
        model: the trained :class:`model_zoo.base.AnomalyModel` in eval mode on ``run.device``.
        data: the :class:`core.DataLoader.DataModule` (only ``eval_dataloader``, ``test_set_names`` and
            ``dataset_info`` are used: evaluation never sees training augmentation).
        run: the :class:`dl_utils.run.RunContext`.
        progress: show tqdm bars (only on a TTY).
    """

    def __init__(self, *, model: Any, data: Any, run: Any, progress: bool = True) -> None:
        self.model, self.data, self.run = model, data, run
        self.device = torch.device(run.device)
        self.progress = progress and sys.stderr.isatty()
        self._inference: dict[str, Inference] = {}
        self._images: dict[str, Inference] = {}
        self._perceptual: dict[str, Any] = {}
        self._inception: dict[tuple[str, str | None], Any] = {}
        self._features: dict[tuple[Any, ...], Tensor] = {}
        self.thresholds_path = Path(run.checkpoint_dir) / THRESHOLDS_FILE

    # -------------------------------------------------------------------------------------------- datasets
    @property
    def test_sets(self) -> list[str]:
        return list(self.data.test_set_names)

    def resolve(self, datasets: Sequence[str] | None) -> list[str]:
        """``None`` -> all test sets; otherwise the names, checked to exist."""
        known = self.test_sets
        if datasets is None:
            return known
        for name in datasets:
            if name not in known and name not in ("train", "val"):
                raise ValueError(f"dataset {name!r} is not a test set; test sets: {', '.join(known)}")
        return list(datasets)

    def info(self, name: str) -> Any:
        return self.data.dataset_info(name)

    def _load(self, name: str, *, run_model: bool) -> Inference:
        loader = self.data.eval_dataloader(name)
        generator = torch.Generator(device=self.device).manual_seed(int(self.run.seed))
        parts: dict[str, list[Any]] = {k: [] for k in ("image", "anomaly_mask", "brain_mask", "label", "path",
                                                       "anomaly_map", "anomaly_score", "reconstruction")}
        what = "inference" if run_model else "loading"
        for batch in tqdm(loader, desc=f"{what} {name}", disable=not self.progress, leave=False):
            for key in ("image", "anomaly_mask", "brain_mask", "label"):
                value = getattr(batch, key)
                parts[key].append(None if value is None else value.detach().cpu())
            parts["path"].extend(batch.path)
            if run_model:
                with torch.no_grad():
                    out = self.model.get_anomaly(batch.image.to(self.device), generator=generator)
                parts["anomaly_map"].append(out.anomaly_map.detach().float().cpu())
                parts["anomaly_score"].append(out.anomaly_score.detach().float().cpu())
                rec = out.reconstruction
                parts["reconstruction"].append(None if rec is None else rec.detach().float().cpu())
        if not parts["image"]:
            raise ValueError(f"dataset {name!r} is empty")
        info = self.info(name)
        return Inference(name=name, image=torch.cat(parts["image"]).float(), anomaly_map=_cat(parts["anomaly_map"]),
                         anomaly_score=_cat(parts["anomaly_score"]), reconstruction=_cat(parts["reconstruction"]),
                         anomaly_mask=_cat(parts["anomaly_mask"]), brain_mask=_cat(parts["brain_mask"]),
                         label=torch.cat(parts["label"]), path=parts["path"], info=info)

    def inference(self, name: str) -> Inference:
        """Model outputs on a dataset (``'train'``, ``'val'`` or a test set), computed once and cached.

        Each dataset gets its own generator seeded with ``run.seed`` on ``run.device``, so results do not
        depend on the order of the tasks.
        """
        if name not in self._inference:
            logger.info("evaluation: running the model on %r", name)
            self.model.eval()
            self._inference[name] = self._load(name, run_model=True)
        return self._inference[name]

    def images(self, name: str) -> Inference:
        """A dataset's images and masks without running the model (e.g. the healthy training set for FID)."""
        if name in self._inference:
            return self._inference[name]
        if name not in self._images:
            self._images[name] = self._load(name, run_model=False)
        return self._images[name]

    # -------------------------------------------------------------------------------------------- thresholds
    def threshold(self, *, fpr: float, explicit: float | None) -> tuple[float, dict[str, Any]]:
        """The operating point: ``explicit`` (from YAML) or the healthy threshold at ``fpr`` from thresholds.json."""
        if explicit is not None:
            return float(explicit), {"source": "yaml", "threshold": float(explicit)}
        if not self.thresholds_path.is_file():
            raise FileNotFoundError(
                f"{self.thresholds_path}: no healthy thresholds; enable a 'thresholding' task (it runs first) or "
                f"give 'threshold' in the task's params"
            )
        saved = json.loads(self.thresholds_path.read_text())
        key = f"{fpr:g}"
        if key not in saved["thresholds"]:
            raise ValueError(f"{self.thresholds_path}: no threshold at fpr {key}; available: "
                             f"{', '.join(saved['thresholds'])} (add it to the thresholding task's 'fprs')")
        entry = saved["thresholds"][key]
        return float(entry["threshold"]), {"source": str(self.thresholds_path), **saved["provenance"], **entry}

    # -------------------------------------------------------------------------------------------- networks
    def perceptual(self, backend: str) -> Any:
        if backend not in self._perceptual:
            net = make_perceptual(backend).to(self.device).eval()
            self._perceptual[backend] = net
        return self._perceptual[backend]

    def perceptual_distance(self, backend: str, x: Tensor, y: Tensor, *, spatial: bool = False,
                            batch_size: int = 32) -> Tensor:
        """LPIPS between x and y ([N,1,H,W] in [0,1], on the CPU): [N] (or [N,1,H,W] maps), on the CPU."""
        net = self.perceptual(backend)
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                a, b = x[i:i + batch_size].to(self.device), y[i:i + batch_size].to(self.device)
                outs.append((net.spatial(a, b) if spatial else net(a, b)).float().cpu())
        return torch.cat(outs)

    def features(self, backend: str, weights_path: str | None, name: str, kind: Literal["input", "reconstruction"],
                 limit: int | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Inception features of a dataset's inputs or reconstructions ([n, d] float64), cached."""
        key_net = (backend, weights_path)
        if key_net not in self._inception:
            self._inception[key_net] = make_inception(backend, weights_path, self.device)
        net = self._inception[key_net]
        key = (backend, weights_path, name, kind, limit)
        if key not in self._features:
            source = self.images(name) if kind == "input" else self.inference(name)
            images = source.image if kind == "input" else source.reconstruction
            if images is None:
                raise ValueError(f"the model returns no reconstruction; FID of restorations on {name!r} is undefined")
            images = images[:limit] if limit else images
            logger.info("Inception features (%s) of %r %ss: %d images", net.backend_name, name, kind, len(images))
            self._features[key] = net.features(images)
        return self._features[key], dict(net.provenance)


def make_perceptual(backend: str) -> Any:
    """The LPIPS(AlexNet) distance of the project (optim.losses.perceptual), for RQI and CACI."""
    from optim.losses.perceptual import PerceptualDistance

    return PerceptualDistance(net="alex", backend=backend)


def make_inception(backend: str, weights_path: str | None, device: torch.device) -> Any:
    """The Inception feature network for FID/KID (optim.inception)."""
    from optim.inception import InceptionFeatures

    return InceptionFeatures(backend=backend, weights_path=weights_path, device=device)


# ------------------------------------------------------------------------------------------------ tasks
def _examples(n: int, candidates: np.ndarray, k: int) -> list[int]:
    idx = np.where(candidates)[0] if candidates.any() else np.arange(n)
    if idx.size <= k:
        return idx.tolist()
    return idx[np.linspace(0, idx.size - 1, k).round().astype(int)].tolist()


@register_task("thresholding")
def thresholding(ctx: EvalContext, *, dataset: str = "val", fprs: Sequence[float] = (0.01, 0.02, 0.05),
                 use_brain_mask: bool = True) -> TaskResult:
    """Healthy thresholds at target pixel FPRs, written to ``checkpoints/thresholds.json``.

    Args:
        dataset: the healthy set the operating points come from (the healthy validation split, 'val').
        fprs: target mean pixel FPRs (each in (0,1)).
        use_brain_mask: count only brain pixels when the set has brain masks (the output says which).
    """
    inf = ctx.inference(dataset)
    foreground = inf.brain_mask if use_brain_mask else None
    results = {f"{f:g}": segmentation.threshold_at_fpr(inf.anomaly_map, f, foreground) for f in fprs}
    first = next(iter(results.values()))
    provenance = {"dataset": dataset, "n_images": first.n_images, "region": first.region,
                  "rule": "pixel anomalous iff map > threshold; FPR = mean over images of the pixel FPR"}
    ctx.thresholds_path.parent.mkdir(parents=True, exist_ok=True)
    ctx.thresholds_path.write_text(json.dumps(
        {"provenance": provenance, "thresholds": {k: r.to_dict() for k, r in results.items()}}, indent=2))
    metrics = {}
    for r in results.values():
        metrics[f"threshold_{fpr_tag(r.target_fpr)}"] = r.threshold
        metrics[f"achieved_fpr_{fpr_tag(r.target_fpr)}"] = r.achieved_fpr
    metrics["n_images"] = float(first.n_images)
    note = (f"Thresholds from healthy set '{dataset}' ({first.n_images} images, {first.region} pixels), "
            f"written to {ctx.thresholds_path}.")
    return TaskResult(metrics={dataset: metrics}, manifest={"thresholds": provenance}, notes=[note])


@register_task("detection")
def detection(ctx: EvalContext, *, datasets: Sequence[str] | None = None, healthy: str = "healthy_test") -> TaskResult:
    """Image-level AUROC/AUPRC of the anomaly score: healthy set vs each pathological set and all pooled.

    Args:
        datasets: pathological sets (default: every pathological test set).
        healthy: the unseen healthy test set (label 0).
    """
    ref = ctx.inference(healthy)
    result = TaskResult()
    curves, scores = {}, {healthy: ref.anomaly_score.numpy()}
    pooled_s, pooled_y = [ref.anomaly_score], [ref.label]
    for name in ctx.resolve(datasets):
        if name == healthy or not ctx.info(name).pathological:
            continue
        inf = ctx.inference(name)
        s = torch.cat([ref.anomaly_score, inf.anomaly_score])
        y = torch.cat([ref.label, inf.label])
        result.metrics[name] = {**classification.image_level_metrics(s, y),
                                "score_mean": float(inf.anomaly_score.mean())}
        curves[name], scores[name] = (s.numpy(), y.numpy()), inf.anomaly_score.numpy()
        pooled_s.append(inf.anomaly_score)
        pooled_y.append(inf.label)
    if len(pooled_s) > 1:
        s, y = torch.cat(pooled_s), torch.cat(pooled_y)
        result.metrics["all_pathological"] = classification.image_level_metrics(s, y)
        curves["all_pathological"] = (s.numpy(), y.numpy())
    result.metrics[healthy] = {"score_mean": float(ref.anomaly_score.mean()), "n": float(len(ref))}
    result.figures["roc_pr"] = vis.roc_pr_figure(curves, title=f"image level vs {healthy}")
    result.figures["scores"] = vis.box_figure(scores, ylabel="anomaly score", title="image anomaly scores")
    return result


@register_task("segmentation")
def segmentation_task(ctx: EvalContext, *, datasets: Sequence[str] | None = None, threshold: float | None = None,
                      fpr: float = 0.05, region: Literal["brain", "all"] = "brain",
                      size_bins: Sequence[Sequence[float]] = segmentation.REFERENCE_SIZE_BINS,
                      n_examples: int = 4) -> TaskResult:
    """Pixel-level AUROC/AUPRC, Dice at the healthy threshold, oracle best Dice, per lesion-size bin.

    Args:
        datasets: sets to evaluate (default: every test set with anomaly masks).
        threshold: explicit operating point (overrides thresholds.json).
        fpr: which healthy threshold to read from thresholds.json.
        region: 'brain' evaluates pixels in the brain mask or the anomaly mask (all pixels when the set has
            no brain mask); 'all' evaluates every pixel.
        size_bins: [low, high) lesion areas in pixels at 128x128, scaled with the image area.
        n_examples: example strips per dataset.
    """
    if region not in ("brain", "all"):
        raise ValueError(f"region {region!r} is not one of 'brain', 'all'")
    th, provenance = ctx.threshold(fpr=fpr, explicit=threshold)
    result = TaskResult(manifest={"segmentation_threshold": provenance})
    per_image_dice: dict[str, np.ndarray] = {}
    for name in ctx.resolve(datasets):
        if not ctx.info(name).has_anomaly_mask:
            continue
        inf = ctx.inference(name)
        roi = None
        if region == "brain" and inf.brain_mask is not None:
            roi = ((inf.brain_mask + inf.anomaly_mask) > 0).float()
        m = {"threshold": th, **segmentation.pixel_auroc_auprc(inf.anomaly_map, inf.anomaly_mask, roi),
             **segmentation.dice_at_threshold(inf.anomaly_map, inf.anomaly_mask, th, roi),
             **segmentation.best_dice(inf.anomaly_map, inf.anomaly_mask, roi)}
        dice = segmentation.dice_per_image(inf.anomaly_map, inf.anomaly_mask, th, roi)
        bins, scaled = segmentation.lesion_size_bin(inf.anomaly_mask, size_bins)
        for k, (lo, hi) in enumerate(scaled):
            tag = f"size_{lo:g}-{hi:g}px"
            inside = bins == k
            m[f"{tag}_n"] = float(inside.sum())
            m[f"{tag}_dice_mean"] = float(np.nanmean(dice[inside])) if inside.any() else float("nan")
            if inside.any():
                sub = torch.from_numpy(inside)
                binned = segmentation.pixel_auroc_auprc(inf.anomaly_map[sub], inf.anomaly_mask[sub],
                                                        None if roi is None else roi[sub])
                m[f"{tag}_auroc_pooled"], m[f"{tag}_auprc_pooled"] = binned["auroc_pooled"], binned["auprc_pooled"]
        result.metrics[name] = m
        has_lesion = inf.anomaly_mask.flatten(1).sum(1).numpy() > 0
        per_image_dice[name] = dice[has_lesion & ~np.isnan(dice)]
        pick = _examples(len(inf), has_lesion, n_examples)
        result.figures[f"{name}/examples"] = vis.example_strip(inf, pick, threshold=th, title=name)
    if per_image_dice:
        result.figures["dice_per_image"] = vis.box_figure(per_image_dice, ylabel="Dice at healthy threshold",
                                                          title=f"per-image Dice (threshold {th:.4g})")
    result.notes.append(f"Threshold {th:.6g} ({provenance.get('source')}); 'oracle_*' = best over thresholds on the "
                        f"labelled test data: an upper bound, not a result; region '{region}'.")
    return result


@register_task("localization")
def localization_task(ctx: EvalContext, *, datasets: Sequence[str] | None = None, threshold: float | None = None,
                      fpr: float = 0.05, min_fraction: float = 0.1) -> TaskResult:
    """The reference object-level metric (METHODS section 4) per class (= per dataset) and pooled.

    'box' sets are scored exactly as the reference (one box per row, healthy mass over the healthy-tissue
    mask); 'pixel' sets use the lesion mask as the region (labelled 'pixel' in the table).

    Args:
        datasets: sets to evaluate (default: every test set with anomaly masks).
        threshold: explicit operating point; fpr: which healthy threshold to read otherwise.
        min_fraction: supra-threshold fraction of the region needed for a TP (0.1).
    """
    th, provenance = ctx.threshold(fpr=fpr, explicit=threshold)
    result = TaskResult(manifest={"localization_threshold": provenance})
    pooled: list[dict[str, np.ndarray]] = []
    rows = []
    for name in ctx.resolve(datasets):
        info = ctx.info(name)
        if not info.has_anomaly_mask:
            continue
        inf = ctx.inference(name)
        per = localization.localization_per_image(inf.anomaly_map, inf.anomaly_mask, inf.healthy_tissue, th,
                                                  min_fraction)
        summary = localization.localization_summary(per)
        result.metrics[name] = {"threshold": th, **summary}
        rows.append({"class": name, "annotation": info.annotation or "pixel", **summary})
        pooled.append(per)
    if pooled:
        merged = {k: np.concatenate([p[k] for p in pooled]) for k in pooled[0]}
        summary = localization.localization_summary(merged)
        result.metrics["all_classes"] = {"threshold": th, **summary}
        rows.append({"class": "all_classes", "annotation": "mixed", **summary})
        result.tables["per_class"] = rows
        result.figures["per_class"] = vis.per_class_bars(
            {r["class"]: {"F1": r["f1_mean"], "detected": r["n_detected"] / max(r["n_total"], 1.0)} for r in rows},
            title=f"localisation per class (threshold {th:.4g})")
    result.notes.append(f"Localisation: TP if > {min_fraction:g} of the region is supra-threshold; "
                        f"FP = floor(healthy mass / max(anomaly mass, 1)); threshold {th:.6g}.")
    return result


@register_task("rqi")
def rqi_task(ctx: EvalContext, *, dataset: str = "healthy_test", backend: PerceptualBackend = "auto",
             n_examples: int = 4) -> TaskResult:
    """Restoration Quality Index on unseen healthy images: mean SSIM * (1 - LPIPS), with SSIM, LPIPS, MAE.

    Args:
        dataset: the unseen healthy test set.
        backend: PerceptualDistance backend ('auto', 'lpips', 'stlpips', 'random' for tests).
        n_examples: example strips.
    """
    inf = ctx.inference(dataset)
    if inf.reconstruction is None:
        return TaskResult(notes=[f"RQI skipped: the model returns no reconstruction ({dataset})."])
    ssim = normative.ssim_per_image(inf.reconstruction, inf.image)
    lpips = ctx.perceptual_distance(backend, inf.reconstruction, inf.image).numpy()
    mae = (inf.reconstruction - inf.image).abs().flatten(1).mean(1).numpy()
    result = TaskResult(metrics={dataset: normative.rqi(ssim, lpips, mae)},
                        manifest={"lpips_backend": ctx.perceptual(backend).backend_name})
    result.figures[f"{dataset}/examples"] = vis.example_strip(inf, _examples(len(inf), np.ones(len(inf), bool),
                                                                             n_examples), title=dataset)
    result.figures["rqi_components"] = vis.box_figure({"SSIM": ssim, "LPIPS": lpips, "MAE": mae},
                                                      ylabel="per image", title=f"RQI components ({dataset})")
    return result


@register_task("ahi")
def ahi_task(ctx: EvalContext, *, datasets: Sequence[str] | None = None, reference: str = "train",
             healthy: str = "healthy_test", backend: InceptionBackend = "auto",
             weights_path: str | None = None, min_class_size: int = 10, reference_limit: int | None = None,
             ) -> TaskResult:
    """Anomaly-to-Healthy Index from Frechet distances on Inception features against the healthy training set.

    FID(U,N), FID(P,N), FID(R(P),N) and KID beside each, with n for every set; per class when
    n >= ``min_class_size`` and on all pathological sets pooled. Sets are never tiled.

    Args:
        datasets: pathological sets (default: every pathological test set).
        reference: the healthy training set N ('train', loaded without augmentation).
        healthy: the unseen healthy test set U.
        backend, weights_path: Inception weights (see optim.inception).
        min_class_size: smallest class for a per-class AHI (FID needs >= 2 images; small n is biased).
        reference_limit: use only the first k reference images (None: all), to bound CPU time.
    """
    n_feat, prov = ctx.features(backend, weights_path, reference, "input", reference_limit)
    n_stats = distribution.GaussianStats.from_features(n_feat)
    u_feat, _ = ctx.features(backend, weights_path, healthy, "input")
    fid_u = distribution.frechet_distance(n_stats, u_feat)
    kid_u = distribution.kernel_inception_distance(n_feat, u_feat)
    result = TaskResult(manifest=dict(prov))
    result.metrics[healthy] = {"fid_u": fid_u, "kid_u": kid_u, "n_u": float(len(u_feat)),
                               "n_reference": float(n_stats.n)}
    pooled_p, pooled_r = [], []
    for name in ctx.resolve(datasets):
        if name == healthy or not ctx.info(name).pathological:
            continue
        p_feat, _ = ctx.features(backend, weights_path, name, "input")
        r_feat, _ = ctx.features(backend, weights_path, name, "reconstruction")
        pooled_p.append(p_feat)
        pooled_r.append(r_feat)
        if len(p_feat) >= max(min_class_size, 2):
            result.metrics[name] = _ahi_metrics(n_stats, n_feat, p_feat, r_feat, fid_u)
        else:
            result.notes.append(f"AHI: class {name!r} has n={len(p_feat)} < min_class_size={min_class_size}; "
                                "only in the pooled value.")
    if pooled_p and sum(len(p) for p in pooled_p) >= 2:
        result.metrics["all_pathological"] = _ahi_metrics(n_stats, n_feat, torch.cat(pooled_p), torch.cat(pooled_r),
                                                          fid_u)
    result.notes.append(f"AHI features: {prov.get('fid_backend')} ({prov.get('fid_note')}); reference '{reference}' "
                        f"n={n_stats.n}.")
    return result


def _ahi_metrics(n_stats: distribution.GaussianStats, n_feat: Tensor, p_feat: Tensor, r_feat: Tensor,
                 fid_u: float) -> dict[str, float]:
    fid_p = distribution.frechet_distance(n_stats, p_feat)
    fid_r = distribution.frechet_distance(n_stats, r_feat)
    return {"ahi": normative.ahi(fid_p, fid_r, fid_u), "fid_p": fid_p, "fid_rp": fid_r, "fid_u": fid_u,
            "kid_p": distribution.kernel_inception_distance(n_feat, p_feat),
            "kid_rp": distribution.kernel_inception_distance(n_feat, r_feat), "n_p": float(len(p_feat))}


@register_task("caci")
def caci_task(ctx: EvalContext, *, datasets: Sequence[str] | None = None,
              backend: PerceptualBackend = "auto") -> TaskResult:
    """Conservation-And-Correction Index per annotated image, with MSE and LPIPS inside both regions.

    The healthy region is the brain (or healthy-tissue) mask minus the anomaly mask; without a brain
    mask it is every pixel outside the anomaly mask. Images with an empty anomaly mask are skipped.

    Args:
        datasets: sets with anomaly masks (default: all such test sets).
        backend: PerceptualDistance backend for the spatial LPIPS.
    """
    result = TaskResult()
    pooled_c, pooled_k = [], []
    for name in ctx.resolve(datasets):
        if not ctx.info(name).has_anomaly_mask:
            continue
        inf = ctx.inference(name)
        if inf.reconstruction is None:
            result.notes.append(f"CACI skipped on {name!r}: the model returns no reconstruction.")
            continue
        keep = inf.anomaly_mask.flatten(1).sum(1) > 0
        x, rec = inf.image[keep], inf.reconstruction[keep]
        lesion, healthy = inf.anomaly_mask[keep], inf.healthy_tissue[keep]
        if len(x) == 0:
            continue
        ssim = normative.ssim_maps(rec, x)
        conservation = normative.masked_mean(ssim, healthy)
        correction = 1.0 - normative.masked_mean(ssim, lesion)
        sq = (rec - x).pow(2)
        lp = ctx.perceptual_distance(backend, rec, x, spatial=True)
        result.metrics[name] = {
            **normative.caci(conservation, correction),
            "mse_healthy": float(np.nanmean(normative.masked_mean(sq, healthy))),
            "mse_anomaly": float(np.nanmean(normative.masked_mean(sq, lesion))),
            "lpips_healthy": float(np.nanmean(normative.masked_mean(lp, healthy))),
            "lpips_anomaly": float(np.nanmean(normative.masked_mean(lp, lesion))),
        }
        pooled_c.append(conservation)
        pooled_k.append(correction)
    if pooled_c:
        result.metrics["all_annotated"] = normative.caci(np.concatenate(pooled_c), np.concatenate(pooled_k))
        result.manifest["lpips_backend"] = ctx.perceptual(backend).backend_name
    return result


# ------------------------------------------------------------------------------------------------ evaluator
class DownstreamEvaluator:
    """One ``downstream_tasks.<name>`` block: a registered task and its options, validated at build time.

    Args:
        task: a registered task name (see :data:`TASKS`).
        **options: the task function's keyword options (unknown names and wrong types are errors).
    """

    def __init__(self, *, task: str, **options: Any) -> None:
        if task not in TASKS:
            raise ValueError(f"params.task: {task!r} is not a registered evaluation task; valid tasks: "
                             f"{', '.join(sorted(TASKS))}")
        fn = TASKS[task]
        valid = [p for p in inspect.signature(fn).parameters if p != "ctx"]
        hints = typing.get_type_hints(fn)
        for key, value in options.items():
            if key not in valid:
                raise ValueError(f"params.{key}: unknown option for task {task!r}; valid options: {', '.join(valid)}")
            problem = type_problem(value, hints.get(key, Any))
            if problem:
                raise ValueError(f"params.{key}: {problem}")
        self.task = task
        self.options = dict(options)

    def __call__(self, ctx: EvalContext) -> TaskResult:
        return TASKS[self.task](ctx, **self.options)

    def __repr__(self) -> str:
        return f"DownstreamEvaluator(task={self.task!r}, options={self.options!r})"


def build_downstream(tasks_cfg: Mapping[str, Any] | None) -> dict[str, DownstreamEvaluator]:
    """Build every enabled ``downstream_tasks`` block (``enabled: false`` ones are skipped)."""
    if tasks_cfg is None:
        return {}
    if not isinstance(tasks_cfg, Mapping):
        raise ConfigError(f"downstream_tasks: expected a mapping of named blocks, got {type(tasks_cfg).__name__}")
    return {name: build(block, f"downstream_tasks.{name}", base=DownstreamEvaluator)
            for name, block in tasks_cfg.items() if is_enabled(block)}


def run_downstream(tasks_cfg: Mapping[str, Any] | None, *, model: Any, data: Any, logger: Any, run: Any,
                   progress: bool = True) -> dict[str, Any]:
    """Run every enabled evaluation block; thresholding blocks first, the others in YAML order.

    Args:
        tasks_cfg: the ``downstream_tasks`` section.
        model: trained model (best weights loaded, eval mode, on ``run.device``).
        data: the data module; logger: the ExperimentLogger; run: the RunContext.

    Returns:
        ``{block name: {dataset: {metric: value}}}``; also writes thresholds.json and report.md.
    """
    evaluators = build_downstream(tasks_cfg)
    ordered = sorted(evaluators.items(), key=lambda item: item[1].task != "thresholding")
    ctx = EvalContext(model=model, data=data, run=run, progress=progress)
    results: dict[str, Any] = {}
    reports: list[tuple[str, TaskResult]] = []
    for name, evaluator in ordered:
        logging.getLogger(__name__).info("evaluation task %r (%s)", name, evaluator.task)
        start = time.perf_counter()
        result = evaluator(ctx)
        result.notes.append(f"Took {time.perf_counter() - start:.1f} s (including any first inference of its sets).")
        for dataset, metrics in result.metrics.items():
            logger.log_eval(name, dataset, metrics)
        for key, fig in result.figures.items():
            logger.log_figure(f"eval/{name}/{key}", fig)
        for key, rows in result.tables.items():
            logger.log_table(f"eval/{name}/{key}", rows)
        if result.manifest:
            logger.update_manifest(**{f"eval/{name}": result.manifest})
        results[name] = result.metrics
        reports.append((name, result))
    if ordered:
        write_report(Path(run.run_dir) / "report.md", reports, {n: e.task for n, e in ordered})
    return results


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(path: Path, reports: Sequence[tuple[str, TaskResult]], tasks: Mapping[str, str]) -> Path:
    """Markdown report: one table per evaluation block (datasets x metrics), then its notes and provenance."""
    lines = ["# Evaluation report", "",
             "Metrics prefixed `oracle_` use thresholds chosen on labelled test data: upper bounds, not results.", ""]
    for name, result in reports:
        lines += [f"## {name} (task `{tasks[name]}`)", ""]
        if result.metrics:
            columns = list(dict.fromkeys(k for m in result.metrics.values() for k in m))
            lines.append("| dataset | " + " | ".join(columns) + " |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for dataset, metrics in result.metrics.items():
                lines.append(f"| {dataset} | " + " | ".join(_fmt(metrics.get(c, "")) for c in columns) + " |")
            lines.append("")
        for table, rows in result.tables.items():
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                lines += [f"Table `{table}`:", "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
                lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
                lines.append("")
        lines += [f"- {note}" for note in result.notes]
        if result.manifest:
            lines.append(f"- provenance: `{json.dumps(result.manifest, default=str, sort_keys=True)}`")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
