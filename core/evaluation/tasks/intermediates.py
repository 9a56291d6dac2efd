"""A model's intermediate images (``AnomalyOutput.extras``): figures for every run, files for reuse when asked.

For AutoDDPM these are the first reconstruction ``x_rec``, the statistic ``c``, the re-sampling ``mask``, the
``stitched`` start and the re-sampled ``x_inp``: the steps of "mask, stitch and re-sample" that explain a map.
The task uses the evaluation's cached inference (no extra model run).

With ``save_intermediates: true`` each dataset's arrays go to ``<run folder>/intermediates/<dataset>.npz``
(``image``, ``anomaly_map``, ``reconstruction`` when present, every extra, float32 [N,1,H,W], and ``path``), read
back with ``numpy.load(path)``.
"""

from __future__ import annotations

import numpy as np
import torch

from core.evaluation.context import EvalContext, Inference
from core.evaluation.registry import DatasetNames, TaskResult, register_task
from core.evaluation.tasks._examples import pick_examples
from dl_utils import visualization as vis


def _arrays(inf: Inference) -> dict[str, np.ndarray]:
    arrays = {"image": inf.image}
    if inf.anomaly_map is not None:
        arrays["anomaly_map"] = inf.anomaly_map
    if inf.reconstruction is not None:
        arrays["reconstruction"] = inf.reconstruction
    out = {k: v.numpy().astype(np.float32) for k, v in {**arrays, **inf.extras}.items()}
    out["path"] = np.asarray(inf.path)
    return out


@register_task("intermediates")
def intermediates(ctx: EvalContext, *, datasets: DatasetNames = None, n_examples: int = 4,
                  save_intermediates: bool = False) -> TaskResult:
    """Figures of the model's intermediates per dataset; optionally the arrays in the run folder.

    Args:
        datasets: which sets (default: every test set).
        n_examples: rows per figure (lesion images first where there are annotations).
        save_intermediates: write ``intermediates/<dataset>.npz`` next to the run's checkpoints folder.
    """
    result = TaskResult()
    for name in ctx.resolve(datasets):
        inf = ctx.inference(name)
        if not inf.extras:
            result.notes.append(f"'{name}': the model returns no intermediates (AnomalyOutput.extras is empty).")
            continue
        has_lesion = np.ones(len(inf), bool) if inf.anomaly_mask is None else \
            (inf.anomaly_mask.flatten(1).sum(1) > 0).numpy()
        columns: dict[str, torch.Tensor] = {"input": inf.image, **inf.extras}
        if inf.anomaly_map is not None:
            columns["anomaly map"] = inf.anomaly_map
        picks = pick_examples(len(inf), has_lesion, n_examples)
        result.figures[f"{name}/intermediates"] = vis.intermediate_strip(columns, picks, title=name)
        metrics = {"n_images": float(len(inf))}
        if "mask" in inf.extras:  # the share of each image that was re-sampled
            metrics["mask_fraction_mean"] = float(inf.extras["mask"].flatten(1).mean(1).mean())
        result.metrics[name] = metrics
        if save_intermediates:
            if ctx.artifact_dir is None:
                raise ValueError("intermediates: save_intermediates needs a run folder (no artifact directory)")
            path = ctx.artifact_dir.parent / "intermediates" / f"{name}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **_arrays(inf))
            result.manifest.setdefault("files", {})[name] = str(path)
            result.notes.append(f"'{name}': intermediates ({', '.join(inf.extras)}) written to {path}.")
    return result
