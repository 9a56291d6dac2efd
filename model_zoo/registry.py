"""The method registry: every model class of ``model_zoo``, its kind and a tiny config of it.

Each :class:`Method` names one class (``module_name`` and ``class_name``, as a YAML ``model`` block does) and the
``params`` of a tiny instance that works on [B,1,32,32] inputs. A class may have several entries (variants the
contract test must cover, e.g. a DDPM with DDIM inference).

- ``kind='scorer'``: an :class:`~model_zoo.base.AnomalyModel` (trains, then scores anomalies);
- ``kind='stage-1'``: a :class:`~model_zoo.base.TrainableModel` only (trains, never scores); ``next_stage`` says
  what scores on its checkpoint, and the evaluation and prediction quote it when they refuse the network.

``tests/model_zoo/test_contract.py`` is parametrised from :data:`METHODS` (scorers get the scorer contract, stage-1
networks the training contract) and fails for a trainable class of ``model_zoo`` without an entry here. Adding a
method: ``docs/adding_a_method.md``.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from model_zoo.base import AnomalyModel, TrainableModel

SIZE = 32  # the tiny configs' input size

Params = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class Method:
    """One registered method (a class, or a variant of it).

    Attributes:
        name: the entry's id (the contract test's parameter id), unique.
        module_name, class_name: the class, as in a YAML ``model`` block.
        kind: ``'scorer'`` (an AnomalyModel) or ``'stage-1'`` (trains only).
        tiny: ``tiny(workdir)`` -> fresh ``params`` with tiny sizes for 32x32 inputs; ``workdir`` is a folder for
            files they point to (a stage-1 checkpoint), unused by most.
        next_stage: for a stage-1 network, what to train on its checkpoint to score anomalies.
    """

    name: str
    module_name: str
    class_name: str
    kind: Literal["scorer", "stage-1"]
    tiny: Callable[[Path], Params]
    next_stage: str = ""

    @property
    def cls(self) -> type[TrainableModel]:
        """The registered class (imported on first access)."""
        return getattr(importlib.import_module(self.module_name), self.class_name)

    def block(self, workdir: Path) -> dict[str, Any]:
        """A fresh tiny YAML ``model`` block ``{module_name, class_name, params}``."""
        return {"module_name": self.module_name, "class_name": self.class_name,
                "params": copy.deepcopy(self.tiny(workdir))}


TINY_UNET = {"channels": [8, 16, 16], "num_head_channels": 8, "norm_num_groups": 8}
TINY_GAN = {"image_size": SIZE, "latent_dim": 8, "generator_channels": [8, 8, 4], "critic_channels": [4, 8]}
TINY_VQVAE = {"image_size": SIZE, "channels": [4, 4], "num_res_channels": [4, 4], "num_res_layers": 1,
              "num_embeddings": 8, "embedding_dim": 4}
TINY_SIVAE = {"image_size": SIZE, "channels": [4, 8], "zdim": 4, "beta_neg": 4.0}
RANDOM_SQUEEZE = {"net": "squeeze", "backend": "random"}  # LPIPS heads on a seeded random backbone: tests only


def _ddpm(**changes: Any) -> Callable[[Path], Params]:
    return lambda _: {"network": TINY_UNET, "inference": {"sampler": "ddpm", "noise_level": 2},
                      "val_inference": {"sampler": "ddim", "noise_level": 2, "steps": 2}, **changes}


def _fixed(**params: Any) -> Callable[[Path], Params]:
    return lambda _: params


def _stage1_checkpoint(workdir: Path, name: str, model: TrainableModel) -> str:
    """A checkpoint of an untrained stage-1 network, as the trainer writes it (the next stage loads it strictly)."""
    from dl_utils.checkpoint import save_checkpoint

    return str(save_checkpoint(workdir / f"{name}.pt", {"model": model.state_dict(), "ema": None}))


def _fanogan(workdir: Path) -> Params:
    from model_zoo.fanogan import WGANGP

    return {**TINY_GAN, "wgan_checkpoint": _stage1_checkpoint(workdir, "wgan", WGANGP(**TINY_GAN))}


def _ltm(workdir: Path) -> Params:
    from model_zoo.ltm import VQVAE

    return {"vqvae": TINY_VQVAE, "vqvae_checkpoint": _stage1_checkpoint(workdir, "vqvae", VQVAE(**TINY_VQVAE)),
            "width": 8, "depth": 1, "heads": 2}


def _scorer(name: str, module: str, class_name: str, tiny: Callable[[Path], Params]) -> Method:
    return Method(name=name, module_name=f"model_zoo.{module}", class_name=class_name, kind="scorer", tiny=tiny)


METHODS: tuple[Method, ...] = (
    _scorer("ae", "ae", "AutoEncoder", _fixed(channels=[4, 8], latent_channels=8, kernel_size=3)),
    _scorer("vae", "vae", "VAE", _fixed(image_size=SIZE, channels=[4, 8], latent_dim=8)),
    _scorer("vae_sampled", "vae", "VAE", _fixed(image_size=SIZE, channels=[4, 8], latent_dim=8, sample_at_test=True)),
    _scorer("ddpm", "ddpm", "DDPM", _ddpm()),
    _scorer("anoddpm_simplex", "ddpm", "DDPM", _ddpm(noise={"noise_type": "simplex"},
                                                     inference={"sampler": "strided", "noise_level": 2, "steps": 2})),
    _scorer("ddpm_ddim", "ddpm", "DDPM", _ddpm(inference={"sampler": "ddim", "noise_level": 2, "steps": 2})),
    _scorer("autoddpm", "autoddpm", "AutoDDPM", _ddpm(repaint={"noise_level": 1, "resample_steps": 2},
                                                      perceptual=RANDOM_SQUEEZE)),
    _scorer("dae", "dae", "DenoisingAE", _fixed(channels=[4, 8, 8], noise_resolution=4, postprocess="kascenas")),
    _scorer("cevae", "cevae", "CeVAE", _fixed(image_size=SIZE, channels=[4, 8], latent_dim=8, box_size=[4, 8],
                                              test_samples=2)),
    _scorer("mae", "mae", "MaskedAE", _fixed(image_size=SIZE, patch_size=8, hidden_size=16, mlp_dim=32, num_layers=1,
                                             num_heads=2, decoder_hidden_size=16, decoder_mlp_dim=32,
                                             decoder_num_layers=1, decoder_num_heads=2, test_maskings=3)),
    # deform_start_epoch 0: the NCC and smoothness terms (and so the deformer) are trained from the first step
    _scorer("morphaeus", "morphaeus", "MorphAEus", _fixed(channels=[4, 8, 8, 8, 8], deformer_channels=4,
                                                          deform_start_epoch=0)),
    # the reference test: one x0 prediction per box at t = 499 (cosine, T = 1000); a 3x3 grid of 12/12/8 px boxes
    _scorer("pddpm", "pddpm", "PatchedDDPM", _fixed(image_size=SIZE, patch_size=12, network={
        **TINY_UNET, "attention_levels": [False, True, True]})),
    Method(name="wgangp", module_name="model_zoo.fanogan", class_name="WGANGP", kind="stage-1", tiny=_fixed(**TINY_GAN),
           next_stage="train model_zoo.fanogan.FAnoGAN (fanogan*.yaml) with model.params.wgan_checkpoint = this "
                      "run's checkpoints/latest.pt"),
    _scorer("fanogan", "fanogan", "FAnoGAN", _fanogan),
    _scorer("sivae", "soft_intro", "SoftIntroVAE", _fixed(**TINY_SIVAE)),
    _scorer("ra", "soft_intro", "RA", _fixed(**TINY_SIVAE, perceptual=RANDOM_SQUEEZE)),
    _scorer("vqvae", "ltm", "VQVAE", _fixed(**TINY_VQVAE)),
    _scorer("ltm", "ltm", "LTM", _ltm),
    _scorer("phanes", "phanes", "PHANES", _fixed(
        **TINY_SIVAE, perceptual=RANDOM_SQUEEZE, inpaint_channels=[4, 8, 8], aot_blocks=1, aot_rates=[1, 2],
        disc_channels=[4, 8, 8, 8], n_ellipses=2, disc_blur_kernel=9, disc_blur_sigma=2.0, vgg_backend="random")),
)
"""Every registered method; ids are unique (checked by the contract test)."""


def method(name: str) -> Method:
    """The entry called ``name``.

    Raises:
        KeyError: naming the registered entries.
    """
    found = [m for m in METHODS if m.name == name]
    if not found:
        raise KeyError(f"no registered method {name!r}; registered: {', '.join(m.name for m in METHODS)}")
    return found[0]


def entries_of(cls: type) -> list[Method]:
    """The entries of ``cls`` or of the nearest registered class it derives from (a subclass defined elsewhere,
    e.g. in a test, inherits its parent's entries); [] when none."""
    for klass in cls.__mro__:
        found = [m for m in METHODS if (m.module_name, m.class_name) == (klass.__module__, klass.__qualname__)]
        if found:
            return found
    return []


def stage1_problem(cls: type) -> str | None:
    """Why ``cls`` cannot score anomalies, for the evaluation's and prediction's errors; None for a scorer.

    Returns:
        e.g. ``"WGANGP is a stage-1 network: it trains but does not score anomalies (train model_zoo.fanogan...)"``.
    """
    if issubclass(cls, AnomalyModel):
        return None
    if not issubclass(cls, TrainableModel):
        return f"{cls.__name__} is not a model_zoo.base.AnomalyModel"
    hint = next((m.next_stage for m in entries_of(cls) if m.next_stage), "")
    return (f"{cls.__name__} is a stage-1 network: it trains but does not score anomalies (no get_anomaly)"
            + (f"; to score, {hint}" if hint else ""))
