"""Normative evaluation: restoration quality (RQI), distribution shift (AHI), conservation and correction (CACI)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

from core.evaluation.context import EvalContext
from core.evaluation.per_image import PerImage
from core.evaluation.registry import Between, DatasetName, DatasetNames, TaskResult, register_task
from core.evaluation.tasks._examples import pick_examples
from dl_utils import visualization as vis
from optim.metrics import distribution, normative

PerceptualBackend = Literal["auto", "lpips", "stlpips", "random"]
InceptionBackend = Literal["auto", "torchvision", "pytorch_fid", "fid_helper", "random"]
PositiveInt = Annotated[int, Between(0, math.inf)]
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_FEATURE_CACHE = "cache/features"


@register_task("rqi")
def rqi_task(ctx: EvalContext, *, dataset: DatasetName = "healthy_test", backend: PerceptualBackend = "auto",
             n_examples: int = 4) -> TaskResult:
    """Restoration Quality Index on unseen healthy images: mean SSIM * (1 - LPIPS), with SSIM, LPIPS, MAE.

    Per image: ``ssim``, ``lpips``, ``mae`` and ``rqi`` (the term RQI averages).

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
                        manifest={"lpips_backend": ctx.perceptual(backend).backend_name},
                        per_image={dataset: PerImage.of_images(inf, {
                            "ssim": ssim, "lpips": lpips, "mae": mae, "rqi": normative.rqi_per_image(ssim, lpips)})})
    result.figures[f"{dataset}/examples"] = vis.example_strip(inf, pick_examples(len(inf), np.ones(len(inf), bool),
                                                                             n_examples), title=dataset)
    result.figures["rqi_components"] = vis.box_figure({"SSIM": ssim, "LPIPS": lpips, "MAE": mae},
                                                      ylabel="per image", title=f"RQI components ({dataset})")
    return result


@register_task("ahi")
def ahi_task(ctx: EvalContext, *, datasets: DatasetNames = None, reference: DatasetName = "train",
             healthy: DatasetName = "healthy_test", backend: InceptionBackend = "auto",
             weights_path: str | None = None, min_class_size: int = 10, reference_limit: int | None = None,
             draws: PositiveInt = 5, feature_cache: str | None = DEFAULT_FEATURE_CACHE,
             save_features: bool = True) -> TaskResult:
    """Anomaly-to-Healthy Index from Frechet distances on Inception features against the healthy training set.

    FID(U,N), FID(P,N) and FID(R(P),N) at **equal n** (:func:`optim.metrics.normative.ahi_equal_n`:
    n = min(|U|, |P|), U and P subsampled without replacement to n in each of ``draws`` seeded draws, R(P) on
    P's rows, FIDs averaged over the draws), with ``n_fid`` and ``draws`` beside them and KID on the full sets;
    per class when n_P >= ``min_class_size`` and on all pathological sets pooled. The healthy row holds
    FID(U,N) on all of U (``n_fid`` = n_U). Sets are never tiled.

    Args:
        datasets: pathological sets (default: every pathological test set).
        reference: the healthy training set N ('train', loaded without augmentation).
        healthy: the unseen healthy test set U.
        backend, weights_path: Inception weights (see optim.inception).
        min_class_size: smallest class for a per-class AHI (FID needs >= 2 images; small n is biased).
        reference_limit: use only the first k reference images (None: all), to bound CPU time.
        draws: subsamples averaged per FID (seeded with the run seed).
        feature_cache: folder of the on-disk cache of input features (N, U, P; never R(P)), relative to the
            repository root unless absolute; None or "" switches it off.
        save_features: keep every feature row per image (``input_features`` of N's rows, U and P,
            ``restored_features`` of R(P), float32, with the pooled sets, ``draws`` and ``seed`` as constants of N),
            so that a study can recompute the pooled AHI on resampled images.
    """
    cache_dir, cache_log_start = _cache_dir(feature_cache), len(ctx.feature_cache_log)
    n_feat, prov = ctx.features(backend, weights_path, reference, "input", reference_limit, cache_dir=cache_dir)
    n_stats = distribution.GaussianStats.from_features(n_feat)
    u_feat, _ = ctx.features(backend, weights_path, healthy, "input", cache_dir=cache_dir)
    result = TaskResult(manifest={**prov, "fid_sample_rule": f"equal n = min(|U|, |P|), mean over {draws} "
                                                           "subsamples without replacement"})
    result.metrics[healthy] = {"fid_u": distribution.frechet_distance(n_stats, u_feat), "n_fid": float(len(u_feat)),
                               "kid_u": distribution.kernel_inception_distance(n_feat, u_feat),
                               "n_u": float(len(u_feat)), "n_reference": float(n_stats.n)}
    pooled_p, pooled_r, pooled_names = [], [], []
    for name in ctx.resolve(datasets):
        if name == healthy or not ctx.info(name).pathological:
            continue
        p_feat, _ = ctx.features(backend, weights_path, name, "input", cache_dir=cache_dir)
        r_feat, _ = ctx.features(backend, weights_path, name, "reconstruction")
        pooled_p.append(p_feat)
        pooled_r.append(r_feat)
        pooled_names.append(name)
        if save_features:
            inf = ctx.images(name)
            result.per_image[name] = PerImage.of_images(inf, {"input_features": _float32(p_feat),
                                                              "restored_features": _float32(r_feat)})
        if len(p_feat) >= max(min_class_size, 2):
            result.metrics[name] = normative.ahi_equal_n(n_feat, u_feat, p_feat, r_feat, draws=draws, seed=ctx.seed,
                                                         reference_stats=n_stats)
        else:
            result.notes.append(f"AHI: class {name!r} has n={len(p_feat)} < min_class_size={min_class_size}; "
                                "only in the pooled value.")
    if pooled_p and sum(len(p) for p in pooled_p) >= 2:
        result.metrics["all_pathological"] = normative.ahi_equal_n(
            n_feat, u_feat, torch.cat(pooled_p), torch.cat(pooled_r), draws=draws, seed=ctx.seed,
            reference_stats=n_stats)
    if save_features:
        _feature_tables(result, ctx, reference=reference, healthy=healthy, limit=reference_limit,
                        n_feat=n_feat, u_feat=u_feat, pooled=pooled_names, draws=draws)
    result.notes.append(f"AHI features: {prov.get('fid_backend')} ({prov.get('fid_note')}); reference '{reference}' "
                        f"n={n_stats.n}. FID(U,N), FID(P,N) and FID(R(P),N) of a row are compared at the same n "
                        f"(`n_fid` = min(n_U, n_P)): the mean over {draws} seeded subsamples without replacement "
                        "(R(P) on the same rows as P); KID on the full sets.")
    if cache_dir is not None:
        log = ctx.feature_cache_log[cache_log_start:]
        hits, misses = ([n for n, what, _ in log if what == kind] for kind in ("hit", "miss"))
        result.notes.append(f"Input features cached in {cache_dir}: hits {hits or 'none'}, misses {misses or 'none'}.")
        result.manifest["feature_cache"] = str(cache_dir)
    return result


def _float32(features: torch.Tensor) -> np.ndarray:
    return features.detach().cpu().numpy().astype(np.float32)


def _feature_tables(result: TaskResult, ctx: EvalContext, *, reference: str, healthy: str, limit: int | None,
                    n_feat: torch.Tensor, u_feat: torch.Tensor, pooled: list[str], draws: int) -> None:
    """The per-image feature rows of N (the rows used) and U, with what the pooled AHI was computed from."""
    result.per_image[reference] = PerImage.of_images(
        ctx.images(reference), {"input_features": _float32(n_feat)},
        {"healthy": healthy, "pathological": np.asarray(pooled, dtype=str), "draws": draws, "seed": ctx.seed},
        limit=limit or None)
    result.per_image[healthy] = PerImage.of_images(ctx.images(healthy), {"input_features": _float32(u_feat)})


def _cache_dir(feature_cache: str | None) -> Path | None:
    """The ``feature_cache`` option as a folder (relative: against the repository root); None when off."""
    if not feature_cache:
        return None
    path = Path(feature_cache).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


@register_task("caci")
def caci_task(ctx: EvalContext, *, datasets: DatasetNames = None,
              backend: PerceptualBackend = "auto") -> TaskResult:
    """Conservation-And-Correction Index per annotated image, with MSE and LPIPS inside both regions.

    The healthy region is the brain (or healthy-tissue) mask minus the anomaly mask; without a brain
    mask it is every pixel outside the anomaly mask. Images with an empty anomaly mask are skipped.
    Per image: ``conservation``, ``correction`` and ``caci`` (the term CACI averages; NaN for skipped images).

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
        per = {"conservation": np.full(len(inf), np.nan), "correction": np.full(len(inf), np.nan)}
        per["conservation"][keep.numpy()], per["correction"][keep.numpy()] = conservation, correction
        per["caci"] = normative.caci_per_image(per["conservation"], per["correction"])
        result.per_image[name] = PerImage.of_images(inf, per)
    if pooled_c:
        result.metrics["all_annotated"] = normative.caci(np.concatenate(pooled_c), np.concatenate(pooled_k))
        result.manifest["lpips_backend"] = ctx.perceptual(backend).backend_name
    return result
