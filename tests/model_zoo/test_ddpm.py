"""DDPM / AnoDDPM: closed forms, reverse steps against MONAI, inference settings and their network-call counts,
determinism, configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

import model_zoo.diffusion.noise as noise_module
from core.Configurator import ConfigError, build, load_config
from data.batch import Batch
from dl_utils.reinit import randomize_zero_layers
from model_zoo.base import AnomalyModel
from model_zoo.ddpm import DDPM
from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.procedures import Schedule, noise_to, partial_diffusion, q_sample, reverse_step
from model_zoo.diffusion.settings import InferenceSetting, ScheduleSetting, UNetSetting

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "normative_eval" / "configs"
TINY_NET = UNetSetting(channels=(8, 16, 16), num_head_channels=8, norm_num_groups=8)
TINY: dict[str, Any] = {"channels": [8, 16, 16], "num_head_channels": 8, "norm_num_groups": 8}
SIMPLEX = DiffusionNoise(noise_type="simplex")


def setting(sampler: str = "ddpm", level: int = 6, steps: int | None = None, eta: float = 0.0) -> InferenceSetting:
    return InferenceSetting(sampler=sampler, noise_level=level, steps=steps, eta=eta)  # type: ignore[arg-type]


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_ddpm(**overrides: Any) -> DDPM:
    """A tiny DDPM (L = 6, full chain) whose zero-initialised output layers are re-initialised, so eps != 0."""
    torch.manual_seed(0)
    params = {"network": TINY_NET, "inference": setting(), "val_inference": setting("ddim", 4, 2), **overrides}
    model = DDPM(**params).eval()
    assert randomize_zero_layers(model) > 0
    return model


def count_unet_calls(model: DDPM) -> list[int]:
    """Record the timestep of every UNet call (all images of a batch share one step at inference)."""
    steps: list[int] = []
    model.unet.register_forward_pre_hook(lambda _m, args, kwargs: steps.append(int(kwargs["timesteps"][0])),
                                         with_kwargs=True)
    return steps


@pytest.fixture(scope="module")
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=2e-2)


@pytest.fixture(scope="module")
def schedule(scheduler: DDPMScheduler) -> Schedule:
    return Schedule.from_betas(scheduler.betas)


def test_schedule_is_the_reference_linear_schedule(schedule: Schedule) -> None:
    assert schedule.num_steps == 1000
    assert schedule.betas[0] == pytest.approx(1e-4) and schedule.betas[-1] == pytest.approx(2e-2)
    assert schedule.abar(-1) == 1.0
    assert schedule.abar(249) == pytest.approx(float(torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000,
                                                                                       dtype=torch.float64), 0)[249]))


def test_noising_matches_closed_form_and_monai(scheduler: DDPMScheduler, schedule: Schedule) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g)
    eps = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([0, 250, 999])
    abar = torch.tensor([schedule.abar(int(s)) for s in t], dtype=torch.float32).reshape(-1, 1, 1, 1)
    expected = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    ours = q_sample(x0, t, eps, torch.tensor(schedule.alphas_cumprod, dtype=torch.float32))
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours, scheduler.add_noise(x0, eps, t))
    torch.testing.assert_close(noise_to(x0[1:2], 250, eps[1:2], schedule), expected[1:2])
    assert torch.equal(noise_to(x0, -1, eps, schedule), x0)


def test_ddpm_reverse_step_matches_monai_step(scheduler: DDPMScheduler, schedule: Schedule) -> None:
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 1, 8, 8, generator=g)
    eps = 0.3 * torch.randn(2, 1, 8, 8, generator=g)
    for t in (0, 1, 250, 999):
        ours = reverse_step(lambda _x, _t: eps, x_t, t, t - 1, schedule=schedule, noise=DiffusionNoise(),
                            generator=torch.Generator().manual_seed(t))
        ref, _ = scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(t))
        # MONAI accumulates abar in float32 (relative error ~1e-4 at t=999); ours is float64
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=5e-4)


def test_reverse_steps_are_exact_with_the_true_noise(schedule: Schedule) -> None:
    # With the true eps, x0_hat = x0; a deterministic DDIM step lands exactly on the same-noise point at t_prev
    # (any stride), and the DDPM mean of the last step (t=0 -> clean) is x0 itself.
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 1, 8, 8, generator=g)
    eps = torch.randn(2, 1, 8, 8, generator=g)
    true_eps = lambda _x, _t: eps  # noqa: E731
    for t, t_prev in ((250, 249), (250, 125), (40, -1)):
        ddim = reverse_step(true_eps, noise_to(x0, t, eps, schedule), t, t_prev, schedule=schedule,
                            noise=DiffusionNoise(), method="ddim")
        torch.testing.assert_close(ddim, noise_to(x0, t_prev, eps, schedule), atol=1e-5, rtol=1e-5)
    last = reverse_step(true_eps, noise_to(x0, 0, eps, schedule), 0, -1, schedule=schedule, noise=DiffusionNoise())
    torch.testing.assert_close(last, x0, atol=1e-5, rtol=1e-5)
    # the DDPM posterior mean of a step t -> t-1 is the closed form of q(x_{t-1} | x_t, x0)
    t = 100
    x_t = noise_to(x0, t, eps, schedule)
    a_t, a_p, beta = schedule.abar(t), schedule.abar(t - 1), schedule.betas[t]
    mean = (a_p**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_p) / (1 - a_t)) * x_t
    var = (1 - a_p) / (1 - a_t) * beta
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    step = reverse_step(true_eps, x_t, t, t - 1, schedule=schedule, noise=DiffusionNoise(),
                        generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(step, mean + var**0.5 * z, atol=1e-5, rtol=1e-5)


def test_ddim_step_matches_monai_ddim(schedule: Schedule) -> None:
    ddim = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", beta_start=1e-4, beta_end=2e-2)
    ddim.set_timesteps(10)  # MONAI's stride: 1000 // 10 = 100
    g = torch.Generator().manual_seed(3)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), 0.5 * torch.randn(2, 1, 8, 8, generator=g)
    for t in (900, 100, 50):
        ref, _ = ddim.step(eps, t, x_t)
        ours = reverse_step(lambda _x, _t: eps, x_t, t, max(t - 100, -1), schedule=schedule, noise=DiffusionNoise(),
                            method="ddim")
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_inference_setting_timesteps_calls_and_label() -> None:
    assert setting("ddpm", 5).timesteps == [5, 4, 3, 2, 1, 0] and setting("ddpm", 5).network_calls == 6
    assert setting("strided", 250, 6).timesteps == [250, 200, 150, 100, 50, 0]
    ddim = setting("ddim", 250, 25)
    steps = ddim.timesteps
    assert len(steps) == 25 == ddim.network_calls and steps[0] == 250 and steps[-1] == 0
    assert all(a > b for a, b in zip(steps[:-1], steps[1:], strict=True))
    assert setting("ddim", 7, 8).timesteps == list(range(7, -1, -1))
    assert setting("strided", 9, 1).timesteps == [9]
    assert setting().label == "partial diffusion from L=6, full DDPM chain, 7 network calls"
    assert setting("ddim", 6, 3, eta=0.5).label.endswith("DDIM eta=0.5 (approximation), 3 network calls")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sampler": "strided", "noise_level": 5, "steps": 7}, r"steps=7 for sampler 'strided' must be in \[1, noise"),
    ({"sampler": "ddim", "noise_level": 5}, r"steps=None for sampler 'ddim'"),
    ({"sampler": "ddpm", "noise_level": 5, "steps": 3}, "only for the 'strided' and 'ddim' samplers"),
    ({"sampler": "euler", "noise_level": 5}, "'euler' is not one of"),
    ({"sampler": "strided", "noise_level": 5, "steps": 2, "eta": 0.5}, "eta=0.5"),
    ({"noise_level": -1}, "noise_level=-1"),
    ({"noise_level": 5, "draws": 0}, "draws=0 must be an integer >= 1"),
    ({"noise_level": 5, "draws": True}, "draws=True must be an integer"),
])
def test_inference_setting_is_validated(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InferenceSetting(**kwargs)


@pytest.mark.parametrize("inference", [setting(), setting("strided", 6, 3), setting("ddim", 6, 4),
                                       setting("ddim", 6, 1), setting("strided", 5, 6)],
                         ids=["ddpm", "strided3", "ddim4", "ddim1", "strided_every_step"])
def test_network_calls_equal_the_unet_forward_calls(inference: InferenceSetting) -> None:
    model = tiny_ddpm()
    calls = count_unet_calls(model)
    model.get_anomaly(torch.rand(2, 1, 16, 16), generator=torch.Generator().manual_seed(0), inference=inference)
    assert len(calls) == inference.network_calls == model.network_calls(inference)
    assert calls == inference.timesteps


def test_draws_average_independent_reconstructions_and_multiply_the_calls() -> None:
    model = tiny_ddpm()
    one = InferenceSetting(sampler="strided", noise_level=6, steps=3)
    four = InferenceSetting(sampler="strided", noise_level=6, steps=3, draws=4)
    assert four.network_calls == 12 == model.network_calls(four)
    assert "mean of 4 reconstructions, 12 network calls" in model.inference_label(four)
    calls = count_unet_calls(model)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0), inference=four)
    assert calls == [6, 3, 0] * 4
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())  # the map of the mean
    # the averaged reconstruction varies less from seed to seed than one draw (about 1/sqrt(4) of the spread)
    spread = {}
    for name, inference in (("one", one), ("four", four)):
        recs = torch.stack([model.reconstruct(x, inference=inference, generator=torch.Generator().manual_seed(s))
                            for s in range(12)])
        spread[name] = recs.std(dim=0).mean().item()
    assert spread["four"] < 0.7 * spread["one"], spread


@pytest.mark.parametrize(("inference", "expected"), [
    (setting("ddpm"), [6, 5, 4, 3, 2, 1, 0]), (setting("strided", 6, 3), [6, 3, 0]),
    (setting("ddim", 6, 4), [6, 4, 2, 0])])
def test_partial_diffusion_network_calls(inference: InferenceSetting, expected: list[int]) -> None:
    model = tiny_ddpm(inference=inference)
    calls = count_unet_calls(model)
    x = torch.rand(2, 1, 16, 16)
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    assert calls == expected  # L+1 calls for the full chain, ``steps`` for strided/ddim
    assert out.reconstruction is not None and 0 <= out.reconstruction.min() and out.reconstruction.max() <= 1
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())
    torch.testing.assert_close(out.anomaly_score, out.anomaly_map.mean(dim=(1, 2, 3)))


def test_simplex_noise_is_used_in_noising_and_every_reverse_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_ddpm(noise=SIMPLEX)
    steps: list[list[int]] = []
    original = noise_module.simplex_noise

    def spy(shape: Any, *, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        steps.append(timesteps.tolist())
        return original(shape, timesteps=timesteps, **kwargs)

    monkeypatch.setattr(noise_module, "simplex_noise", spy)
    model.get_anomaly(torch.rand(2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    # the one-shot noising to L=6, then the noise of the reverse steps at t = 6..1 (t = 0 adds none)
    assert steps == [[6, 6], [6, 6], [5, 5], [4, 4], [3, 3], [2, 2], [1, 1]]
    steps.clear()
    model.train()
    torch.manual_seed(0)
    model.training_losses(Batch(image=torch.rand(2, 1, 16, 16)))
    assert len(steps) == 1 and all(0 <= s < 1000 for s in steps[0])


def test_gaussian_partial_diffusion_follows_the_generator(schedule: Schedule) -> None:
    # 'ddpm' with eps = 0 and no clipping: the chain is a fixed linear recursion of the drawn noise,
    # so the same generator gives the same result and another seed a different one.
    zero = lambda x, _t: torch.zeros_like(x)  # noqa: E731
    x = torch.rand(2, 1, 8, 8)

    def run(seed: int) -> torch.Tensor:
        return partial_diffusion(zero, x, setting=setting("ddpm", 10), schedule=schedule, noise=DiffusionNoise(),
                                 generator=torch.Generator().manual_seed(seed), clip=None)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_get_anomaly_is_deterministic_under_a_generator() -> None:
    model = tiny_ddpm(noise=SIMPLEX)
    x = torch.rand(2, 1, 16, 16)
    a = model.get_anomaly(x, generator=torch.Generator().manual_seed(5))
    torch.rand(3)
    b = model.get_anomaly(x, generator=torch.Generator().manual_seed(5))
    c = model.get_anomaly(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    assert not torch.equal(a.anomaly_map, c.anomaly_map)


def test_training_losses_and_forward() -> None:
    model = tiny_ddpm().train()
    batch = Batch(image=torch.rand(2, 1, 16, 16))
    torch.manual_seed(1)
    losses = model(batch)
    assert set(losses) == {"noise_mse"} and losses["noise_mse"].ndim == 0
    losses["noise_mse"].backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.manual_seed(1)
    torch.testing.assert_close(model.training_losses(batch)["noise_mse"], losses["noise_mse"].detach())


def test_a_setting_per_call_equals_a_model_configured_with_it_and_changes_nothing() -> None:
    model = tiny_ddpm()
    ddim = setting("ddim", 5, 3, eta=0.3)
    configured = tiny_ddpm(inference=ddim)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    per_call = model.get_anomaly(x, generator=torch.Generator().manual_seed(1), inference=ddim)
    fixed = configured.get_anomaly(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(per_call.anomaly_map, fixed.anomaly_map)
    assert model.inference == setting()  # the model's own setting is untouched
    default = model.get_anomaly(x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(default.anomaly_map, per_call.anomaly_map)
    with pytest.raises(ValueError, match=r"noise_level=1000 must be in \[0, num_train_timesteps=1000\)"):
        model.get_anomaly(x, inference=setting("ddpm", 1000))


def test_validation_losses_use_a_fixed_generator_and_the_cheap_setting() -> None:
    model = tiny_ddpm(val_inference=setting("strided", 4, 2))
    calls = count_unet_calls(model)
    batch = Batch(image=torch.rand(2, 1, 16, 16))
    first = model.validation_losses(batch)
    assert calls == [4, 0]
    torch.rand(4)
    second = model.validation_losses(batch)
    assert set(first) == {"recon_mae", "recon_mse"}
    assert torch.equal(first["recon_mae"], second["recon_mae"])


def test_state_dict_holds_only_the_unet_and_loads_strictly() -> None:
    model = tiny_ddpm(channels_last=True)
    assert all(k.startswith("unet.") for k in model.state_dict())
    other = tiny_ddpm(noise=SIMPLEX)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x, t = torch.rand(2, 1, 16, 16), torch.tensor([3, 700])
    assert not torch.allclose(other.eps(x, t), model.eps(x, t), atol=1e-3)  # different weights differ
    other.load_state_dict(model.state_dict(), strict=True)
    assert model.eps(x, t).abs().mean() > 1e-2  # a non-zero output layer: the comparison below means something
    torch.testing.assert_close(other.eps(x, t), model.eps(x, t), atol=1e-5, rtol=1e-5)  # channels_last agrees
    assert model.eps(x, t).dtype == torch.float32  # 'auto' autocast is off on the CPU


@pytest.mark.parametrize(("params", "match"), [
    ({"autocast_dtype": "int8"}, "autocast_dtype='int8'"),
    ({"inference": setting("ddpm", 1000)}, r"inference\.noise_level=1000"),
    ({"val_inference": setting("ddim", 1200, 3)}, r"val_inference\.noise_level=1200"),
    ({"schedule": ScheduleSetting(num_train_timesteps=5)}, r"inference\.noise_level=6 must be in \[0, .*=5\)"),
    ({"compile_mode": "fastest"}, "compile_mode='fastest' is not one of"),
])
def test_bad_options_are_rejected(params: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_ddpm(**params)
    with pytest.raises(ValueError, match="same length"):
        UNetSetting(channels=(8, 16), attention_levels=(False, True, True))
    with pytest.raises(ValueError, match="noise_type 'perlin'"):
        DiffusionNoise(noise_type="perlin")  # type: ignore[arg-type]


@pytest.mark.parametrize(("params", "match"), [
    ({"inference": {"noise_levle": 5}}, r"model\.params\.inference\.noise_levle: unknown key \(did you mean "
                                        r"'noise_level'\?\)"),
    ({"inference": {"sampler": "euler", "noise_level": 5}}, r"model\.params\.inference\.sampler: 'euler' is not one"),
    ({"noise": {"noise_type": "perlin"}}, r"model\.params\.noise\.noise_type: 'perlin' is not one of"),
    ({"network": {"channels": [8, "x"]}}, r"model\.params\.network\.channels: item 1: expected an integer"),
    ({"inference": {"sampler": "ddim", "noise_level": 6, "steps": 9}},
     r"model\.params\.inference: InferenceSetting: steps=9 for sampler 'ddim' must be in \[1, noise_level \+ 1 = 7\]"),
    ({"noise_levle": 5}, r"model\.params\.noise_levle: unknown parameter \(did you mean 'noise'\?\)"),
])
def test_yaml_mistakes_are_config_errors_at_their_path(params: dict[str, Any], match: str) -> None:
    block = {"module_name": "model_zoo.ddpm", "class_name": "DDPM", "params": {"network": TINY, **params}}
    with pytest.raises(ConfigError, match=match):
        build(block, "model", base=AnomalyModel)


def test_yaml_sub_blocks_become_settings() -> None:
    block = {"module_name": "model_zoo.ddpm", "class_name": "DDPM", "params": {
        "network": TINY, "noise": {"noise_type": "simplex", "per_image": False},
        "inference": {"sampler": "strided", "noise_level": 7, "steps": 4}}}
    model = build(block, "model", base=AnomalyModel)
    assert model.inference == setting("strided", 7, 4) and model.network == TINY_NET
    assert model.noise == DiffusionNoise(noise_type="simplex", per_image=False)
    assert model.val_inference == setting("ddim", 7, 8)  # default: DDIM, min(25, L + 1) steps from the test-time L


@pytest.mark.parametrize("name", ["ddpm", "anoddpm_simplex", "autoddpm", "ddpm_cpu", "anoddpm_simplex_cpu",
                                  "autoddpm_cpu"])
def test_configs_build(name: str) -> None:
    config = load_config(CONFIGS / f"{name}.yaml")
    assert set(config) >= {"name", "model", "trainer", "data"} and config["name"] == name
    assert config["data"]["params"]["batch_size"] == 16
    cpu = name.endswith("_cpu")  # the CPU variants: 32x32, lr 1e-3 with an EMA, 1500 steps (issue 17's retuning)
    assert config["trainer"]["params"]["optimizer"]["params"]["lr"] == (1.0e-3 if cpu else 1.0e-4)
    if cpu:
        assert config["trainer"]["params"]["ema_decay"] == 0.995 and config["trainer"]["params"]["max_steps"] == 1500
    model = build(config["model"], "model", base=AnomalyModel)
    assert isinstance(model, DDPM)
    size = config["data"]["params"]["target_size"]
    assert size == ([32, 32] if cpu else [128, 128])
    assert model.noise.noise_type == ("simplex" if "simplex" in name else "gaussian")
    if cpu:  # issue 17's retuning: 10 strided steps x 3 draws from L = 100 (simplex: 150), EMA warm-up
        assert config["trainer"]["params"]["ema_warmup"] is True
        level = 150 if "simplex" in name else 100
        assert model.inference == InferenceSetting(sampler="strided", noise_level=level, steps=10, draws=3)
        assert model.val_inference == setting("ddim", level, 10)
    else:
        level = 200 if name.startswith("autoddpm") else 250  # AutoDDPM's L_r
        assert model.inference == setting("ddpm", level)
        assert model.val_inference == setting("ddim", level, 25)


def test_inference_is_labelled_and_copies_drop_the_compiled_unet() -> None:
    assert tiny_ddpm().inference_label().endswith("full DDPM chain, 7 network calls")
    label = tiny_ddpm(inference=setting("ddim", 6, 3)).inference_label()
    assert "DDIM eta=0 (approximation), 3 network calls" in label and label.startswith("gaussian noise")
    assert tiny_ddpm(noise=SIMPLEX).inference_label(setting("strided", 4, 2)) == (
        "simplex noise, partial diffusion from L=4, strided DDPM (approximation), 2 network calls")
    model = tiny_ddpm(torch_compile=True)
    object.__setattr__(model, "_compiled_unet", object())  # as after a first compiled forward
    clone = copy.deepcopy(model)
    assert clone._compiled_unet is None and model._compiled_unet is not None
    assert torch.equal(clone.unet.conv_in.conv.weight, model.unet.conv_in.conv.weight)
