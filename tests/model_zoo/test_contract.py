"""CPU contract test that every registered model must pass (tiny sizes, random [2,1,32,32] input in [0,1]).

To register a model, append ``(id, factory)`` to :data:`MODEL_CASES`, where ``factory()`` returns a fresh YAML
``model`` block (``{module_name, class_name, params}``) with tiny sizes that works on 32x32 inputs. Every test
builds the model through :func:`core.Configurator.build`, exactly as ``core/Main.py`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from core.Configurator import build
from data.batch import Batch
from dl_utils.reinit import randomize_zero_layers
from model_zoo.base import AnomalyModel, AnomalyOutput

SIZE = 32


def _ae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.ae", "class_name": "AutoEncoder",
            "params": {"channels": [4, 8], "latent_channels": 8, "kernel_size": 3}}


def _vae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.vae", "class_name": "VAE",
            "params": {"image_size": SIZE, "channels": [4, 8], "latent_dim": 8}}


def _vae_sampled_block() -> dict[str, Any]:
    block = _vae_block()
    block["params"]["sample_at_test"] = True
    return block


def _ddpm_block(**extra: Any) -> dict[str, Any]:
    return {"module_name": "model_zoo.ddpm", "class_name": "DDPM",
            "params": {"network": {"channels": [8, 16, 16], "num_head_channels": 8, "norm_num_groups": 8},
                       "inference": {"sampler": "ddpm", "noise_level": 2},
                       "val_inference": {"sampler": "ddim", "noise_level": 2, "steps": 2}, **extra}}


def _anoddpm_simplex_block() -> dict[str, Any]:
    return _ddpm_block(noise={"noise_type": "simplex"}, inference={"sampler": "strided", "noise_level": 2, "steps": 2})


def _ddpm_ddim_block() -> dict[str, Any]:
    return _ddpm_block(inference={"sampler": "ddim", "noise_level": 2, "steps": 2})


def _autoddpm_block() -> dict[str, Any]:
    block = _ddpm_block(repaint={"noise_level": 1, "resample_steps": 2},
                        perceptual={"net": "squeeze", "backend": "random"})
    return {**block, "module_name": "model_zoo.autoddpm", "class_name": "AutoDDPM"}


def _dae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.dae", "class_name": "DenoisingAE",
            "params": {"channels": [4, 8, 8], "noise_resolution": 4, "postprocess": "kascenas"}}


def _cevae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.cevae", "class_name": "CeVAE",
            "params": {"image_size": SIZE, "channels": [4, 8], "latent_dim": 8, "box_size": [4, 8],
                       "test_samples": 2}}


def _mae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.mae", "class_name": "MaskedAE",
            "params": {"image_size": SIZE, "patch_size": 8, "hidden_size": 16, "mlp_dim": 32, "num_layers": 1,
                       "num_heads": 2, "decoder_hidden_size": 16, "decoder_mlp_dim": 32, "decoder_num_layers": 1,
                       "decoder_num_heads": 2, "test_maskings": 3}}


def _morphaeus_block() -> dict[str, Any]:
    # deform_start_epoch 0: the NCC and smoothness terms (and so the deformer) are trained from the first step
    return {"module_name": "model_zoo.morphaeus", "class_name": "MorphAEus",
            "params": {"channels": [4, 8, 8, 8, 8], "deformer_channels": 4, "deform_start_epoch": 0}}


def _pddpm_block() -> dict[str, Any]:
    # the reference test: one x0 prediction per box at t = 499 (cosine, T = 1000); a 3x3 grid of 12/12/8 px boxes
    return {"module_name": "model_zoo.pddpm", "class_name": "PatchedDDPM",
            "params": {"image_size": SIZE, "patch_size": 12,
                       "network": {"channels": [8, 16, 16], "attention_levels": [False, True, True],
                                   "num_head_channels": 8, "norm_num_groups": 8}}}


def _fanogan_block() -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from dl_utils.checkpoint import save_checkpoint
    from model_zoo.fanogan import WGANGP

    arch = {"image_size": SIZE, "latent_dim": 8, "generator_channels": [8, 8, 4], "critic_channels": [4, 8]}
    stage1 = Path(tempfile.mkdtemp(prefix="contract_fanogan_")) / "wgan.pt"
    save_checkpoint(stage1, {"model": WGANGP(**arch).state_dict(), "ema": None})
    return {"module_name": "model_zoo.fanogan", "class_name": "FAnoGAN",
            "params": {**arch, "wgan_checkpoint": str(stage1)}}


def _sivae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.soft_intro", "class_name": "SoftIntroVAE",
            "params": {"image_size": SIZE, "channels": [4, 8], "zdim": 4, "beta_neg": 4.0}}


def _ra_block() -> dict[str, Any]:
    block = _sivae_block()
    perceptual = {"net": "squeeze", "backend": "random"}
    return {**block, "class_name": "RA", "params": {**block["params"], "perceptual": perceptual}}


def _vqvae_block() -> dict[str, Any]:
    return {"module_name": "model_zoo.ltm", "class_name": "VQVAE",
            "params": {"image_size": SIZE, "channels": [4, 4], "num_res_channels": [4, 4], "num_res_layers": 1,
                       "num_embeddings": 8, "embedding_dim": 4}}


def _ltm_block() -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from dl_utils.checkpoint import save_checkpoint
    from model_zoo.ltm import VQVAE

    vqvae = _vqvae_block()["params"]
    stage1 = Path(tempfile.mkdtemp(prefix="contract_ltm_")) / "vqvae.pt"
    save_checkpoint(stage1, {"model": VQVAE(**vqvae).state_dict(), "ema": None})
    return {"module_name": "model_zoo.ltm", "class_name": "LTM",
            "params": {"vqvae": vqvae, "vqvae_checkpoint": str(stage1), "width": 8, "depth": 1, "heads": 2}}


def _phanes_block() -> dict[str, Any]:
    block = _ra_block()
    params = {**block["params"], "inpaint_channels": [4, 8, 8], "aot_blocks": 1, "aot_rates": [1, 2],
              "disc_channels": [4, 8, 8, 8], "n_ellipses": 2, "disc_blur_kernel": 9, "disc_blur_sigma": 2.0,
              "vgg_backend": "random"}
    return {"module_name": "model_zoo.phanes", "class_name": "PHANES", "params": params}


MODEL_CASES: list[tuple[str, Callable[[], dict[str, Any]]]] = [
    ("ae", _ae_block),
    ("vae", _vae_block),
    ("vae_sampled", _vae_sampled_block),
    ("ddpm", _ddpm_block),
    ("anoddpm_simplex", _anoddpm_simplex_block),
    ("ddpm_ddim", _ddpm_ddim_block),
    ("autoddpm", _autoddpm_block),
    ("dae", _dae_block),
    ("cevae", _cevae_block),
    ("mae", _mae_block),
    ("morphaeus", _morphaeus_block),
    ("pddpm", _pddpm_block),
    ("fanogan", _fanogan_block),
    ("sivae", _sivae_block),
    ("ra", _ra_block),
    ("vqvae", _vqvae_block),
    ("ltm", _ltm_block),
    ("phanes", _phanes_block),
]
"""(id, factory returning a tiny YAML model block); other models append here (DDPM, AutoDDPM, ...)."""


@pytest.fixture(params=[factory for _, factory in MODEL_CASES], ids=[name for name, _ in MODEL_CASES])
def model(request: pytest.FixtureRequest) -> AnomalyModel:
    torch.manual_seed(0)
    model = build(request.param(), "model", base=AnomalyModel)
    randomize_zero_layers(model)  # MONAI's diffusion UNet starts with eps = 0; the checks need a non-trivial network
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_builds_from_block(model: AnomalyModel) -> None:
    assert isinstance(model, AnomalyModel)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_training_losses_are_finite_and_reach_every_parameter(model: AnomalyModel, x: torch.Tensor) -> None:
    model.train()
    losses = model.training_losses(Batch(image=x))
    assert losses and all(isinstance(k, str) for k in losses)
    for name, value in losses.items():
        assert value.ndim == 0, f"loss {name!r} must be a scalar, got shape {tuple(value.shape)}"
        assert torch.isfinite(value), f"loss {name!r} is not finite: {value}"
    torch.stack(list(losses.values())).sum().backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    assert not missing, f"no gradient reached {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for _, p in params)
    assert any(p.grad.abs().sum() > 0 for _, p in params)


def test_calling_the_model_returns_training_losses(model: AnomalyModel, x: torch.Tensor) -> None:
    # the trainer calls the (DDP-wrapped) module, so ``forward`` must stay ``training_losses``
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}  # train-mode updates (a VQ EMA codebook)
    torch.manual_seed(0)
    called = model(Batch(image=x))
    model.load_state_dict(buffers)
    torch.manual_seed(0)
    direct = model.training_losses(Batch(image=x))
    assert called.keys() == direct.keys()
    for name in direct:
        torch.testing.assert_close(called[name], direct[name])


def test_anomaly_output_shapes_values_and_device(model: AnomalyModel, x: torch.Tensor) -> None:
    model.eval()
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, AnomalyOutput)
    assert out.anomaly_map.shape == x.shape
    assert out.anomaly_score.shape == (x.shape[0],)
    tensors = [out.anomaly_map, out.anomaly_score, *out.extras.values()]
    if out.reconstruction is not None:
        assert out.reconstruction.shape == x.shape
        assert out.reconstruction.min() >= 0 and out.reconstruction.max() <= 1
        tensors.append(out.reconstruction)
    for t in tensors:
        assert t.device == x.device
        assert torch.isfinite(t).all()
    assert (out.anomaly_map >= 0).all()
    for name, t in out.extras.items():
        assert t.shape[0] == x.shape[0], f"extras[{name!r}] must be [B,...]"


def test_deterministic_under_generator(model: AnomalyModel, x: torch.Tensor) -> None:
    model.eval()
    first = model.get_anomaly(x, generator=torch.Generator().manual_seed(123))
    torch.rand(5)  # the global RNG must not matter
    second = model.get_anomaly(x, generator=torch.Generator().manual_seed(123))
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.anomaly_score, second.anomaly_score)


def test_validation_losses_are_finite_scalars(model: AnomalyModel, x: torch.Tensor) -> None:
    model.eval()
    metrics = model.validation_losses(Batch(image=x), generator=torch.Generator().manual_seed(0))
    assert metrics
    assert all(v.ndim == 0 and math.isfinite(float(v)) for v in metrics.values())
