"""Inference-step sweep: accuracy vs cost of AnoDDPM (and AutoDDPM) under cheaper samplers.

For one trained DDPM, every setting runs partial diffusion from the model's noise level L on the pathological
test sets and reports network evaluations, seconds per image and pixel AUROC / AUPRC:

- ``ddpm``: the full reference chain (L+1 network calls), with several generator seeds;
- ``strided`` k: the DDPM posterior over k evenly spaced steps from L to 0 (k calls);
- ``ddim`` k: the deterministic DDIM update over the same k steps (k calls).

Each setting is an :class:`~model_zoo.diffusion.settings.InferenceSetting` passed per call to
``model.get_anomaly(x, inference=...)`` (the model is never changed; AnoDDPM: ``|x - x_rec|``; AutoDDPM: the
setting applies to the reconstruction from L_r, the RePaint re-sampling is unchanged). Network evaluations are
counted with a forward pre-hook on the UNet and must equal ``model.network_calls(setting)``.

Evaluation is the evaluation package's, as in a run: per setting and seed a fresh
:class:`~core.evaluation.EvalContext` (each dataset with its own generator seeded with the seed) runs a
:class:`SettingModel` (the model under that setting) through the registered tasks ``thresholding`` (5% pixel FPR
on the healthy test set), ``segmentation`` and ``detection``. The table reports the segmentation task's pixel
AUROC / AUPRC per set and their mean over sets, the pixel AUROC / AUPRC pooled over all pixels of all sets inside
the same regions (:meth:`~core.evaluation.Inference.evaluation_region`: brain mask OR anomaly mask where the sets
have brain masks), the detection task's image AUROC (all pathological sets against the healthy one) and the Dice at
the healthy threshold.

"Noise of the benchmark", per setting: every setting is compared with the full chain on the same images, so the
noise of a difference has two parts: the generator (the standard deviation of the full chain's pooled AUROC /
AUPRC over seeds) and the image sample (the paired bootstrap standard deviation of ``metric(setting) -
metric(full chain, seed 0)`` over images resampled with replacement, the same resample for both). The tolerance
of a setting is ``2 * sqrt(seed_std^2 + paired_bootstrap_std^2)``; a setting is "within noise" when its AUROC and
AUPRC are both no lower than the full chain's seed mean minus its tolerance, and the recommendation is the
cheapest such setting (fewest network calls, then seconds).

Outputs (``--out-dir``): ``step_sweep.csv``, ``step_sweep.md`` (the table and the recommendation),
``step_sweep.png`` (AUROC vs network evaluations) and ``step_sweep.json``.

CLI::

    python -m tools.step_sweep --config projects/normative_eval/configs/ddpm.yaml --checkpoint runs/.../best.pt
    python -m tools.step_sweep                      # trains ddpm_cpu.yaml as core/Main.py does, then sweeps it
    python -m tools.step_sweep --set trainer.params.max_steps=300 --set model.params.network.channels=[16,32,32]

Without ``--checkpoint`` the config is trained first through ``core/Main.py`` (its data, model and
``Trainer.fit``, in a run folder under ``--out-dir``/train, no evaluation tasks), so the sweep measures the model a
user's run produces; sizes and budgets are ``--set`` overrides of that YAML.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import statistics
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from core.data_module import DatasetInfo
from core.evaluation import DataSource, DownstreamEvaluator, EvalContext, Inference, run_tasks
from core.evaluation.runner import cost_metrics
from data.batch import Batch
from model_zoo.base import AnomalyModel, AnomalyOutput
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.settings import InferenceSetting
from optim.metrics import auroc, average_precision, segmentation

logger = logging.getLogger(__name__)

DEFAULT_STEPS = (5, 10, 25, 50, 100)
DEFAULT_CONFIG = "projects/normative_eval/configs/ddpm_cpu.yaml"
DEFAULT_AUTODDPM_CONFIG = "projects/normative_eval/configs/autoddpm_cpu.yaml"


@dataclass(frozen=True)
class Setting:
    """One point of the sweep.

    Attributes:
        inference: the sampler, noise level and steps passed to ``get_anomaly``.
        seed: generator seed.
    """

    inference: InferenceSetting
    seed: int = 0

    @property
    def label(self) -> str:
        """Short table name: ``'ddpm (full chain)'``, ``'strided 25'``, ``'ddim 10'``."""
        sampler = self.inference.sampler
        return "ddpm (full chain)" if sampler == "ddpm" else f"{sampler} {self.inference.steps}"


def default_settings(noise_level: int, *, steps: Sequence[int] = DEFAULT_STEPS, full_seeds: int = 2) -> list[Setting]:
    """The full chain with ``full_seeds`` seeds, then strided and DDIM with each of ``steps`` (<= L+1) calls."""
    full = InferenceSetting(sampler="ddpm", noise_level=noise_level)
    settings = [Setting(full, seed) for seed in range(full_seeds)]
    valid = [k for k in steps if 1 <= k <= noise_level + 1]
    settings += [Setting(InferenceSetting(sampler=sampler, noise_level=noise_level, steps=k))
                 for sampler in ("strided", "ddim") for k in valid]
    return settings


# ------------------------------------------------------------------------------------------------ data
class FirstImages:
    """A :class:`~core.evaluation.protocols.DataSource` that keeps the first ``max_images`` images of every set."""

    def __init__(self, data: DataSource, max_images: int) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        self.data, self.max_images = data, max_images

    @property
    def test_set_names(self) -> list[str]:
        return list(self.data.test_set_names)

    def dataset_info(self, name: str) -> DatasetInfo:
        return self.data.dataset_info(name)

    def eval_dataloader(self, name: str) -> Iterator[Batch]:
        left = self.max_images
        for batch in self.data.eval_dataloader(name):
            if left <= 0:
                return
            if len(batch) > left:
                batch = replace(batch, image=batch.image[:left], label=batch.label[:left], path=batch.path[:left],
                                subject=batch.subject[:left],
                                anomaly_mask=None if batch.anomaly_mask is None else batch.anomaly_mask[:left],
                                brain_mask=None if batch.brain_mask is None else batch.brain_mask[:left])
            left -= len(batch)
            yield batch


# ------------------------------------------------------------------------------------------------ evaluation
@contextmanager
def count_network_calls(model: DDPM) -> Iterator[list[int]]:
    """Count forward calls of ``model.unet`` (a one-element list, updated in place)."""
    counter = [0]

    def hook(module: torch.nn.Module, args: Any) -> None:
        counter[0] += 1

    handle = model.unet.register_forward_pre_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


class SettingModel(AnomalyModel):
    """``model`` evaluated under one inference setting: what :class:`~core.evaluation.EvalContext` runs per setting.

    ``get_anomaly(x, generator=g)`` is ``model.get_anomaly(x, generator=g, inference=setting)`` (the model is never
    changed); the UNet calls of every call are recorded in :attr:`calls_per_batch`.
    """

    def __init__(self, model: DDPM, setting: InferenceSetting) -> None:
        super().__init__()
        self.model, self.setting = model, setting
        self.calls_per_batch: list[int] = []

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        return self.model.training_losses(batch)

    def get_anomaly(self, x: Tensor, *, generator: torch.Generator | None = None) -> AnomalyOutput:
        """x: [B,1,H,W] in [0,1] -> the wrapped model's output under :attr:`setting`."""
        with count_network_calls(self.model) as counter:
            out = self.model.get_anomaly(x, generator=generator, inference=self.setting)
        self.calls_per_batch.append(counter[0])
        return out

    def counted_network(self) -> torch.nn.Module:
        return self.model.unet

    def inference_label(self) -> str:
        return self.model.inference_label(self.setting)

    def provenance(self) -> dict[str, Any]:
        return self.model.provenance()


def evaluation_tasks(healthy: str, datasets: Sequence[str] | None = None) -> dict[str, DownstreamEvaluator]:
    """The registered tasks of one setting: healthy thresholds (5% pixel FPR) on ``healthy``, ``segmentation``
    (pixel AUROC/AUPRC, Dice at that threshold) on ``datasets`` (None: every set with anomaly masks) and
    ``detection`` (image AUROC of each pathological set against ``healthy``)."""
    return {"thresholds": DownstreamEvaluator(task="thresholding", dataset=healthy, fprs=[0.05]),
            "segmentation": DownstreamEvaluator(task="segmentation", datasets=None if datasets is None
                                                else list(datasets), fpr=0.05, n_examples=0),
            "detection": DownstreamEvaluator(task="detection", datasets=None if datasets is None else list(datasets),
                                             healthy=healthy)}


def run_setting(model: DDPM, data: DataSource, setting: Setting, *, device: torch.device,
                healthy: str = "healthy_test", datasets: Sequence[str] | None = None
                ) -> tuple[dict[str, Any], list[Inference]]:
    """Evaluate ``model`` under ``setting`` with the registered tasks in a fresh :class:`EvalContext` seeded with
    ``setting.seed`` (each dataset its own generator, as in a run).

    Returns:
        (row, inferences): ``row`` has the setting, ``network_evals`` (UNet calls per batch, checked against
        ``model.network_calls``), ``s_per_image`` (all sets the model ran on), ``n_images`` (pathological), the
        pixel ``auroc``/``auprc`` pooled over the segmentation sets in the segmentation task's regions, their
        means over sets, per-set ``auroc/<set>``, ``image_auroc`` (detection, all pathological sets pooled) and
        ``dice`` (mean over sets of the pooled Dice at the healthy 5% FPR threshold); ``inferences`` are the
        segmentation sets' :class:`Inference` (maps, masks, regions; on the CPU).
    """
    import matplotlib.pyplot as plt

    if healthy not in data.test_set_names:
        raise ValueError(f"healthy set {healthy!r} is not a test set of the data ({', '.join(data.test_set_names)}); "
                         "the sweep's thresholds and image AUROC need one")
    adapter = SettingModel(model, setting.inference)
    ctx = EvalContext(model=adapter, data=data, device=device, seed=setting.seed, progress=False)
    metrics = {}
    for name, result in run_tasks(evaluation_tasks(healthy, datasets), ctx):
        for figure in result.figures.values():
            plt.close(figure)
        metrics[name] = result.metrics
    seg = metrics["segmentation"]
    if not seg:
        raise ValueError("no test set with anomaly masks to sweep on")
    expected = model.network_calls(setting.inference)
    if len(set(adapter.calls_per_batch)) != 1:
        raise RuntimeError(f"{setting.label}: network calls differ between batches: "
                           f"{sorted(set(adapter.calls_per_batch))}")
    if adapter.calls_per_batch[0] != expected or any(c["network_calls"] != expected for c in ctx.cost.values()):
        raise RuntimeError(f"{setting.label}: {adapter.calls_per_batch[0]} network calls counted, the setting says "
                           f"{expected}")
    inferences = [ctx.inference(name) for name in seg]
    pooled = segmentation.pixel_auroc_auprc(*_pooled(inferences))
    row = {"setting": setting.label, "method": setting.inference.sampler, "steps": setting.inference.steps,
           "seed": setting.seed, "inference_label": adapter.inference_label(), "network_evals": expected,
           "s_per_image": cost_metrics(ctx.cost)["all_datasets"]["s_per_image"],
           "n_images": sum(len(inf) for inf in inferences),
           "auroc": pooled["auroc_pooled"], "auprc": pooled["auprc_pooled"],
           "auroc_mean_over_sets": statistics.fmean(m["auroc_pooled"] for m in seg.values()),
           "auprc_mean_over_sets": statistics.fmean(m["auprc_pooled"] for m in seg.values()),
           "image_auroc": metrics["detection"].get("all_pathological", {}).get("auroc", math.nan),
           "dice": statistics.fmean(m["dice_pooled"] for m in seg.values()),
           **{f"auroc/{name}": m["auroc_pooled"] for name, m in seg.items()}}
    return row, inferences


def _pooled(inferences: Sequence[Inference]) -> tuple[Tensor, Tensor, Tensor]:
    """Maps, anomaly masks and the segmentation task's regions (all ones where a set has none), concatenated."""
    regions = [inf.evaluation_region() for inf in inferences]
    return (torch.cat([inf.anomaly_map for inf in inferences]), torch.cat([inf.anomaly_mask for inf in inferences]),
            torch.cat([torch.ones_like(inf.anomaly_mask) if r is None else r
                       for inf, r in zip(inferences, regions, strict=True)]))


def _per_image(inferences: Sequence[Inference]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-image (scores, labels) of the pixels inside each image's evaluation region."""
    maps, masks, regions = _pooled(inferences)
    keep = regions > 0.5
    scores = [maps[i][keep[i]].numpy().astype(np.float64) for i in range(maps.shape[0])]
    labels = [masks[i][keep[i]].numpy() > 0.5 for i in range(maps.shape[0])]
    return scores, labels


def paired_bootstrap_std(inferences: Sequence[Inference], reference: Sequence[Inference], *, n_boot: int = 200,
                         seed: int = 0) -> dict[str, float]:
    """Bootstrap (images resampled with replacement, all sets pooled, the same resample for both) standard deviation
    of ``metric(inferences) - metric(reference)`` for the pooled pixel AUROC and AUPRC (same images and regions)."""
    scores, labels = _per_image(inferences)
    ref_scores, _ = _per_image(reference)
    rng = np.random.default_rng(seed)
    d_auroc, d_auprc = [], []
    for _ in range(n_boot):
        pick = rng.integers(0, len(scores), len(scores))
        y = np.concatenate([labels[i] for i in pick])
        if y.all() or not y.any():
            continue
        a = np.concatenate([scores[i] for i in pick])
        b = np.concatenate([ref_scores[i] for i in pick])
        d_auroc.append(auroc(a, y) - auroc(b, y))
        d_auprc.append(average_precision(a, y) - average_precision(b, y))
    return {"auroc": float(np.std(d_auroc)) if d_auroc else 0.0, "auprc": float(np.std(d_auprc)) if d_auprc else 0.0}


def sweep(model: DDPM, data: DataSource, settings: Sequence[Setting], *, device: torch.device,
          healthy: str = "healthy_test", datasets: Sequence[str] | None = None, n_boot: int = 200) -> dict[str, Any]:
    """Run every setting; return rows, the benchmark noise, the tolerance and the recommendation."""
    model.eval().to(device)
    rows, all_inferences = [], []
    for setting in settings:
        row, inferences = run_setting(model, data, setting, device=device, healthy=healthy, datasets=datasets)
        rows.append(row)
        all_inferences.append(inferences)
        logger.info("%-18s seed %d: %4d calls, %.3f s/image, AUROC %.4f, AUPRC %.4f, image AUROC %.4f",
                    setting.label, setting.seed, row["network_evals"], row["s_per_image"], row["auroc"], row["auprc"],
                    row["image_auroc"])
    full = [r for r in rows if r["method"] == "ddpm"]
    if not full:
        raise ValueError("the settings must include the full chain ('ddpm') as the reference")
    reference_inferences = all_inferences[rows.index(full[0])]
    noise = {"seed_std_auroc": _std([r["auroc"] for r in full]), "seed_std_auprc": _std([r["auprc"] for r in full]),
             "n_seeds": len(full), "n_boot": n_boot}
    reference = {k: statistics.fmean(r[k] for r in full) for k in ("auroc", "auprc")}
    for row, inferences in zip(rows, all_inferences, strict=True):
        paired = (paired_bootstrap_std(inferences, reference_inferences, n_boot=n_boot)
                  if n_boot > 0 and row is not full[0] else {"auroc": 0.0, "auprc": 0.0})
        ok = True
        for key in ("auroc", "auprc"):
            row[f"paired_boot_std_{key}"] = paired[key]
            row[f"tolerance_{key}"] = 2.0 * math.hypot(noise[f"seed_std_{key}"], paired[key])
            row[f"delta_{key}"] = row[key] - reference[key]
            ok = ok and row[f"delta_{key}"] >= -row[f"tolerance_{key}"]
        row["within_noise"] = bool(ok)
    candidates = sorted((r for r in rows if r["within_noise"]), key=lambda r: (r["network_evals"], r["s_per_image"]))
    recommendation = candidates[0]["setting"] if candidates else "ddpm (full chain)"
    return {"rows": rows, "reference": reference, "noise": noise,
            "recommendation": recommendation, "n_images": rows[0]["n_images"],
            "sets": [inf.name for inf in reference_inferences], "healthy": healthy,
            "noise_level": model.inference.noise_level, "model": type(model).__name__}


def _std(values: Sequence[float]) -> float:
    return float(statistics.stdev(values)) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------------------ outputs
COLUMNS = ("setting", "seed", "network_evals", "s_per_image", "auroc", "auprc", "image_auroc", "dice",
           "delta_auroc", "delta_auprc",
           "tolerance_auroc", "tolerance_auprc", "paired_boot_std_auroc", "paired_boot_std_auprc", "within_noise",
           "auroc_mean_over_sets", "auprc_mean_over_sets")


def markdown_table(result: Mapping[str, Any]) -> str:
    """The sweep as a Markdown table followed by the noise, tolerance and recommendation."""
    lines = ["| setting | seed | network evals | s / image | pixel AUROC | pixel AUPRC | image AUROC | dAUROC (tol) "
             "| dAUPRC (tol) | within noise |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['setting']} | {r['seed']} | {r['network_evals']} | {r['s_per_image']:.3f} | "
                     f"{r['auroc']:.4f} | {r['auprc']:.4f} | {r['image_auroc']:.4f} | "
                     f"{r['delta_auroc']:+.4f} ({r['tolerance_auroc']:.4f}) | "
                     f"{r['delta_auprc']:+.4f} ({r['tolerance_auprc']:.4f}) | {'yes' if r['within_noise'] else 'no'} |")
    noise = result["noise"]
    lines += ["", f"Model {result['model']}, L = {result['noise_level']}, {result['n_images']} pathological images "
              f"({', '.join(result['sets'])}); pixel AUROC/AUPRC pooled over pixels in the segmentation task's region "
              f"(brain or lesion); image AUROC: the detection task, every pathological image against "
              f"'{result['healthy']}'.",
              f"Full chain over {noise['n_seeds']} seeds: AUROC {result['reference']['auroc']:.4f} "
              f"(seed std {noise['seed_std_auroc']:.4f}), AUPRC {result['reference']['auprc']:.4f} (seed std "
              f"{noise['seed_std_auprc']:.4f}). d = setting - full-chain mean; tol = 2 sqrt(seed std^2 + paired "
              f"bootstrap std^2) ({noise['n_boot']} image resamples, paired with the full chain, seed 0).",
              "Recommendation (cheapest setting within the tolerance of the full chain): "
              f"**{result['recommendation']}**."]
    return "\n".join(lines) + "\n"


def write_outputs(result: Mapping[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the CSV, Markdown, PNG plot and JSON of a sweep into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "step_sweep.csv", "md": out_dir / "step_sweep.md", "png": out_dir / "step_sweep.png",
             "json": out_dir / "step_sweep.json"}
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
    paths["md"].write_text(markdown_table(result), encoding="utf-8")
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    plot(result, paths["png"])
    return paths


def plot(result: Mapping[str, Any], path: Path) -> Path:
    """AUROC vs network evaluations (log x), one line per sampler, the full chain with its tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    reference = result["reference"]["auroc"]
    tol = 2.0 * result["noise"]["seed_std_auroc"]
    for method, marker in (("strided", "o"), ("ddim", "s")):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["network_evals"])
        if rows:
            ax.plot([r["network_evals"] for r in rows], [r["auroc"] for r in rows], marker=marker, label=method)
    full = [r for r in result["rows"] if r["method"] == "ddpm"]
    ax.scatter([r["network_evals"] for r in full], [r["auroc"] for r in full], marker="*", s=120, color="k",
               label="full DDPM chain", zorder=3)
    ax.axhspan(reference - tol, reference + tol, color="grey", alpha=0.2, label="full chain +- 2 seed std")
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image")
    ax.set_ylabel("pixel AUROC (pooled)")
    ax.set_title(f"{result['model']} L={result['noise_level']}: accuracy vs cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ models
def load_from_checkpoint(config_path: str, checkpoint: str, overrides: Sequence[str] = ()) -> tuple[DDPM, Any]:
    """Build the config's model and data (the project's builder) and load the checkpoint's weights strictly."""
    from core.Configurator import allow_imports, build, load_config
    from core.data_module import DataModule
    from dl_utils.checkpoint import load_model_weights

    config = load_config(config_path, list(overrides))
    allow_imports(config.get("allow_imports"))
    model = build(config["model"], "model", base=DDPM)
    logger.info("%s", load_model_weights(model, checkpoint))
    data = build(config["data"], "data", base=DataModule)
    return model, data


def train_with_main(config_path: str, overrides: Sequence[str], out_dir: Path) -> Path:
    """Train ``config_path`` exactly as ``python core/Main.py --config_path ... --set ...`` does (its data, model and
    ``Trainer.fit`` in a run folder under ``out_dir``), without its evaluation tasks; return the run's ``best.pt``.

    Sizes and budgets are overrides, e.g. ``trainer.params.max_steps=500`` or ``model.params.network.channels=[16,
    32, 32]``.

    Raises:
        RuntimeError: the training run failed (its exit code; the run's own error is in the log above).
    """
    from core.Main import main as run_main

    sets = [*overrides, f"experiment.output_dir={out_dir}", "experiment.task=train", "downstream_tasks=null"]
    before = set(out_dir.glob("*/*/*/"))
    code = run_main(["--config_path", config_path, *(arg for value in sets for arg in ("--set", value))])
    if code != 0:
        raise RuntimeError(f"training {config_path} failed with exit code {code} (see the log above)")
    new_runs = sorted(set(out_dir.glob("*/*/*/")) - before)  # this run's folder, not an earlier run's
    if len(new_runs) != 1 or not (new_runs[0] / "checkpoints" / "best.pt").is_file():
        raise RuntimeError(f"training {config_path} finished but left no single new run with a best.pt under "
                           f"{out_dir} (new run folders: {', '.join(map(str, new_runs)) or 'none'})")
    return new_runs[0] / "checkpoints" / "best.pt"


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: sweep a trained checkpoint, or train the config (as core/Main.py does) first."""
    parser = argparse.ArgumentParser(description="AnoDDPM/AutoDDPM inference-step sweep (accuracy vs cost).")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"the DDPM/AutoDDPM YAML (default {DEFAULT_CONFIG}); without --checkpoint it is trained "
                             "first, as core/Main.py trains it")
    parser.add_argument("--checkpoint", default=None, help="weights trained with --config (skips training)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override a.b=v (sizes and budgets, e.g. trainer.params.max_steps=300); repeatable")
    parser.add_argument("--autoddpm-config", default=DEFAULT_AUTODDPM_CONFIG,
                        help="--method autoddpm/both on a DDPM: the AutoDDPM YAML its weights are evaluated with "
                             "(same network; the --set overrides apply to it too)")
    parser.add_argument("--max-images", type=int, default=None, help="use at most N images per set")
    parser.add_argument("--healthy", default="healthy_test",
                        help="healthy test set: the 5%% FPR threshold (Dice) and the image AUROC reference")
    parser.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="k values for strided/ddim")
    parser.add_argument("--full-seeds", type=int, default=2, help="seeds of the full chain (noise estimate)")
    parser.add_argument("--method", choices=("anoddpm", "autoddpm", "both"), default=None,
                        help="default: the checkpoint config's model, or anoddpm in train mode ('both': train mode)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/step_sweep"))
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    provenance: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                                  "config": args.config, "overrides": list(args.overrides)}
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = str(train_with_main(args.config, args.overrides, args.out_dir / "train"))
        provenance["trained"] = checkpoint
    model, data = load_from_checkpoint(args.config, checkpoint, args.overrides)
    provenance["checkpoint"] = checkpoint
    model.to(device)
    if args.max_images is not None:
        data = FirstImages(data, args.max_images)
    steps = [int(k) for k in args.steps.split(",") if k]
    own = "autoddpm" if _is_autoddpm(model) else "anoddpm"
    method = args.method or own
    if own == "autoddpm" and method != "autoddpm":
        parser.error(f"{args.config} builds {type(model).__name__}: use --method autoddpm (or leave it out)")
    models: dict[str, DDPM] = {}
    if method in ("anoddpm", "both"):
        models["anoddpm"] = model
    if method == "autoddpm" and own == "autoddpm":
        models["autoddpm"] = model
    elif method in ("autoddpm", "both"):
        auto, _ = load_from_checkpoint(args.autoddpm_config, checkpoint, args.overrides)
        if not _is_autoddpm(auto):
            parser.error(f"--autoddpm-config {args.autoddpm_config} builds {type(auto).__name__}, not AutoDDPM")
        models["autoddpm"] = auto.to(device)
        provenance["autoddpm_config"] = args.autoddpm_config
    for method, target in models.items():
        settings = default_settings(target.inference.noise_level, steps=steps, full_seeds=args.full_seeds)
        result = sweep(target, data, settings, device=device, healthy=args.healthy)
        result["provenance"] = provenance
        paths = write_outputs(result, args.out_dir / method)
        print(f"## {method}\n")
        print(markdown_table(result))
        print(f"written: {', '.join(str(p) for p in paths.values())}\n")
    return 0


def _is_autoddpm(model: DDPM) -> bool:
    from model_zoo.autoddpm import AutoDDPM

    return isinstance(model, AutoDDPM)


if __name__ == "__main__":
    raise SystemExit(main())
