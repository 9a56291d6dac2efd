"""Model diagnostics: the figures that show whether a generative model learned anything.

- Models with a prior (:class:`PriorSampler`: VAE, ceVAE, the Soft-Intro VAE family, f-AnoGAN's generator, the
  latent transformer of VQ-VAE + LTM): images sampled from the prior. A model that learned healthy anatomy draws
  brains; one that did not draws blur or noise.
- Partial-diffusion models (:class:`PartialDiffusionModel`: DDPM/AnoDDPM, AutoDDPM's first stage, pDDPM): one healthy
  and one pathological image reconstructed from several noise levels L (the model's own sampler and step count,
  one draw each), with the residuals |x - x_rec|: too low an L copies the lesion, too high a one forgets the
  subject.

Other models get a note and no figure. Every draw comes from a generator seeded with the run's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Annotated, Protocol, runtime_checkable

import torch
from torch import Tensor

from core.evaluation.context import EvalContext
from core.evaluation.registry import Between, DatasetName, OptionalDatasetName, TaskResult, register_task
from dl_utils import visualization as vis
from model_zoo.diffusion.settings import InferenceSetting

SampleCount = Annotated[int, Between(-1, 257)]  # 0 to 256
NOISE_FRACTIONS = (0.25, 0.5, 1.0, 2.0)  # default noise levels, as fractions of the model's own L


@runtime_checkable
class PriorSampler(Protocol):
    """A model that can draw images from its prior."""

    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """[n,1,H,W] in [0,1]."""
        ...


@runtime_checkable
class PartialDiffusionModel(Protocol):
    """A diffusion model that reconstructs an image from a chosen noise level."""

    inference: InferenceSetting
    num_train_timesteps: int

    def reconstruct(self, x: Tensor, *, generator: torch.Generator | None = None,
                    inference: InferenceSetting | None = None) -> Tensor: ...


def noise_settings(model: PartialDiffusionModel, levels: Sequence[int] | None) -> list[InferenceSetting]:
    """One setting per noise level: the model's sampler and steps (capped at L + 1), one draw.

    ``levels`` None: the model's own L times 0.25, 0.5, 1 and 2, within [1, T - 1].
    """
    own = model.inference
    if levels is None:
        levels = [min(max(round(own.noise_level * f), 1), model.num_train_timesteps - 1) for f in NOISE_FRACTIONS]
    settings = []
    for level in dict.fromkeys(int(v) for v in levels):
        steps = None if own.sampler == "ddpm" else min(int(own.steps or 1), level + 1)
        setting = replace(own, noise_level=level, steps=steps, draws=1)
        setting.check_noise_level(model.num_train_timesteps, "model_diagnostics.noise_levels")
        settings.append(setting)
    return settings


@register_task("model_diagnostics")
def model_diagnostics(ctx: EvalContext, *, healthy: DatasetName = "healthy_test",
                      pathological: OptionalDatasetName = None, n_samples: SampleCount = 16,
                      noise_levels: Sequence[int] | None = None) -> TaskResult:
    """Prior samples and reconstructions across noise levels (see the module docstring).

    Args:
        healthy: the set of the healthy example (its first image).
        pathological: the set of the pathological example (its image with the largest anomaly mask, else its
            first); None: the first pathological test set.
        n_samples: prior samples drawn (0 switches them off).
        noise_levels: the L of the diffusion row; None: the model's own L times 0.25, 0.5, 1, 2.
    """
    model, result = ctx.model, TaskResult()
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    model.eval()
    if isinstance(model, PriorSampler) and n_samples > 0:
        samples = model.sample_prior(n_samples, generator=generator).float().cpu()
        result.figures["prior_samples"] = vis.image_grid(samples, title=f"{type(model).__name__}: samples from the "
                                                                        "prior")
        result.notes.append(f"{n_samples} prior samples (seed {ctx.seed}).")
    if isinstance(model, PartialDiffusionModel):
        name = pathological or next((n for n in ctx.test_sets if ctx.info(n).pathological), None)
        x = ctx.images(healthy).image[:1]
        if name is not None:
            inf = ctx.images(name)
            pick = int(inf.anomaly_mask.flatten(1).sum(1).argmax()) if inf.anomaly_mask is not None else 0
            x = torch.cat([x, inf.image[pick:pick + 1]])
        columns: dict[str, Tensor] = {"input": x}
        for setting in noise_settings(model, noise_levels):
            with torch.no_grad():
                x_rec = model.reconstruct(x.to(ctx.device), generator=generator, inference=setting).float().cpu()
            columns[f"L={setting.noise_level}"] = x_rec
            columns[f"|x - x_rec| L={setting.noise_level}"] = (x - x_rec).abs()
        rows = f"'{healthy}'" + (f" and '{name}'" if name is not None else "")
        result.figures["noise_levels"] = vis.intermediate_strip(columns, list(range(len(x))),
                                                                title=f"reconstructions of {rows} by noise level")
        result.notes.append(f"Reconstructions from L = {', '.join(k[2:] for k in columns if k.startswith('L='))} "
                            f"({model.inference.sampler}, one draw each) of {rows}.")
    if not result.figures:
        result.notes.append(f"{type(model).__name__} has neither a prior to sample nor a noise level: no diagnostics.")
    return result
