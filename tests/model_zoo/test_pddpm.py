"""pDDPM: the box grid, box noising and the box loss in training, the grid of patch passes at test, network calls,
batch independence, configs (docs/methods.md#patched-diffusion-pddpm), and a short slow-marked learning run."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from core.Configurator import ConfigError, build, load_config
from core.data_module import DataModule
from data.batch import Batch
from dl_utils.reinit import randomize_zero_layers
from model_zoo.base import AnomalyModel
from model_zoo.diffusion.noise import DiffusionNoise
from model_zoo.diffusion.procedures import predict_x0
from model_zoo.diffusion.settings import InferenceSetting, ScheduleSetting, UNetSetting
from model_zoo.pddpm import PatchedDDPM, grid_boxes, grid_starts
from tests.model_zoo._learning import hypointense_separation

logger = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "projects" / "normative_eval" / "configs"
TINY_NET = UNetSetting(channels=(8, 16, 16), attention_levels=(False, True, True), num_head_channels=8,
                       norm_num_groups=8)
GAUSSIAN = DiffusionNoise(noise_type="gaussian")


pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny_pddpm(**overrides: Any) -> PatchedDDPM:
    """A tiny pDDPM (32 px, boxes of 12 px: starts 0, 12, 24) with non-zero output layers."""
    torch.manual_seed(0)
    params = {"image_size": 32, "patch_size": 12, "network": TINY_NET, **overrides}
    model = PatchedDDPM(**params).eval()
    assert randomize_zero_layers(model) > 0
    return model


def record_unet_inputs(model: PatchedDDPM) -> list[tuple[Tensor, Tensor]]:
    """Every UNet call's (input, timesteps), in call order."""
    calls: list[tuple[Tensor, Tensor]] = []
    model.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append((args[0].detach().clone(), kwargs["timesteps"].clone())),
        with_kwargs=True)
    return calls


class ConstantNoise(DiffusionNoise):
    """Noise of ones: the noised box is then a known closed form."""

    def sample(self, like: Tensor, timesteps: Tensor | int, *, generator: torch.Generator | None = None) -> Tensor:
        return torch.ones_like(like)


class FakeNet(nn.Module):
    """Stands in for the UNet: returns ``fn(call index, input)``."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn
        self.calls = 0
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        out = self.fn(self.calls, x) + 0.0 * self.weight
        self.calls += 1
        return out


def box_extent(mask: Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a [H,W] mask that must be a full rectangle."""
    rows = mask.any(dim=1).nonzero().flatten()
    cols = mask.any(dim=0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    assert mask.sum() == (bottom - top) * (right - left), "the changed pixels do not form one rectangle"
    return top, bottom, left, right


# ------------------------------------------------------------------------------------------------- the grid
def test_grid_is_the_reference_grid() -> None:
    assert grid_starts(128, 48, 48) == [0, 48, 96]  # the last row/column cut to 32 px
    assert grid_starts(64, 24, 24) == [0, 24, 48]  # the CPU variant, last box 16 px
    assert grid_starts(128, 48, 24) == [0, 24, 48, 72, 96]
    boxes = grid_boxes(128, 48, 48)
    assert boxes.shape == (9, 1, 128, 128)
    extents = [box_extent(b[0]) for b in boxes]
    edges = [(0, 48), (48, 96), (96, 128)]
    assert extents == [(*r, *c) for r in edges for c in edges]
    assert torch.equal(boxes.sum(dim=0), torch.ones(1, 128, 128, dtype=torch.long))  # a tiling


@pytest.mark.parametrize(("size", "patch", "stride"), [(32, 12, 6), (30, 7, 7), (32, 32, 32), (20, 9, 4)])
def test_every_grid_covers_every_pixel(size: int, patch: int, stride: int) -> None:
    boxes = grid_boxes(size, patch, stride)
    assert boxes.sum(dim=0).min() >= 1
    assert all(b.sum() > 0 for b in boxes)


# ------------------------------------------------------------------------------------------------- training
def test_training_noise_is_confined_to_one_grid_box_per_image() -> None:
    model = tiny_pddpm(noise=GAUSSIAN).train()
    calls = record_unet_inputs(model)
    x = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    model.training_losses(Batch(image=x))
    (x_in, t), = calls
    grid = [box_extent(b[0]) for b in model.boxes]
    changed = x_in != 2.0 * x - 1.0  # outside the box: the clean image in [-1,1], bit for bit
    for i in range(x.shape[0]):
        assert box_extent(changed[i, 0]) in grid
    assert (t >= 0).all() and (t < 1000).all()


def test_the_box_is_noised_by_the_closed_form() -> None:
    model = tiny_pddpm(noise=ConstantNoise(noise_type="gaussian")).train()
    calls = record_unet_inputs(model)
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    model.training_losses(Batch(image=x))
    (x_in, t), = calls
    x0 = 2.0 * x - 1.0
    for i in range(x.shape[0]):
        abar = math.prod(1.0 - float(b) for b in model.scheduler.betas[: int(t[i]) + 1])
        inside = x_in[i] != x0[i]
        expected = math.sqrt(abar) * x0[i] + math.sqrt(1.0 - abar)  # noise of ones
        torch.testing.assert_close(x_in[i][inside], expected[inside], atol=2e-5, rtol=1e-5)


def test_the_loss_is_the_box_error_over_all_pixels() -> None:
    # the fake network is wrong by exactly 1 everywhere: a loss over the box divided by H*W gives box area / (H*W)
    # (box-mean or whole-image losses would give 1)
    model = tiny_pddpm(noise=GAUSSIAN).train()
    x = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    model.unet = FakeNet(lambda _k, _inp: 2.0 * x)  # = x0 + 1
    calls: list[Tensor] = []
    model.unet.register_forward_pre_hook(lambda _m, args, _kw: calls.append(args[0].clone()), with_kwargs=True)
    loss = model.training_losses(Batch(image=x))["box_l1"].detach()
    areas = (calls[0] != 2.0 * x - 1.0).flatten(1).sum(dim=1).double()
    assert set(areas.tolist()) <= {144.0, 96.0, 64.0}  # 12x12, 12x8 and 8x8 boxes
    expected = float(areas.sum()) / (8 * 32 * 32)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(loss) < 0.15


def test_validation_is_the_box_loss_under_a_fixed_generator() -> None:
    model = tiny_pddpm()
    batch = Batch(image=torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(4)))
    first = model.validation_losses(batch)
    torch.rand(7)
    second = model.validation_losses(batch)
    assert set(first) == {"box_l1"} and torch.equal(first["box_l1"], second["box_l1"])
    other = model.validation_losses(batch, generator=torch.Generator().manual_seed(99))
    assert not torch.equal(first["box_l1"], other["box_l1"])


# ------------------------------------------------------------------------------------------------- test time
def test_each_test_call_noises_one_box_and_the_grid_covers_every_pixel_once() -> None:
    model = tiny_pddpm(image_size=128, patch_size=48, noise=GAUSSIAN)
    calls = record_unet_inputs(model)
    x = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(5))
    model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 9
    x0 = 2.0 * x - 1.0
    covered = torch.zeros(128, 128, dtype=torch.long)
    edges = [(0, 48), (48, 96), (96, 128)]
    for k, (x_in, t) in enumerate(calls):
        assert t.tolist() == [499, 499]
        changed = x_in != x0
        assert torch.equal(changed[0], changed[1])
        assert box_extent(changed[0, 0]) == (*edges[k // 3], *edges[k % 3])  # row-major, the spec's boxes
        covered += changed[0, 0].long()
    assert torch.equal(covered, torch.ones(128, 128, dtype=torch.long))


def test_all_boxes_share_one_noise_field_per_image() -> None:
    model = tiny_pddpm(noise=GAUSSIAN)
    calls = record_unet_inputs(model)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(6))
    model.get_anomaly(x, generator=torch.Generator().manual_seed(8))
    abar = float(model.alphas_cumprod[499])
    x0 = 2.0 * x - 1.0
    field = torch.zeros_like(x)
    for (x_in, _t), box in zip(calls, model.boxes, strict=True):
        field += torch.where(box, (x_in - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar), 0.0)
    # the documented draw order: the field first, one [B,1,H,W] draw from the caller's generator
    expected = GAUSSIAN.sample(x, 499, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(field, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(field[0], field[1], atol=0.1)  # one field per image


def test_box_k_of_the_reconstruction_comes_from_pass_k() -> None:
    model = tiny_pddpm()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(7))
    values = [-0.9 + 0.2 * k for k in range(9)]
    model.unet = FakeNet(lambda k, inp: torch.full_like(inp, values[k]))
    out = model.get_anomaly(x, generator=torch.Generator().manual_seed(0))
    assert out.reconstruction is not None
    for k, box in enumerate(model.boxes):
        torch.testing.assert_close(out.reconstruction[:, box], torch.full_like(out.reconstruction[:, box],
                                                                                 (values[k] + 1.0) / 2.0))
    torch.testing.assert_close(out.anomaly_map, (x - out.reconstruction).abs())
    torch.testing.assert_close(out.anomaly_score, out.anomaly_map.mean(dim=(1, 2, 3)))


def test_overlapping_boxes_are_averaged() -> None:
    model = tiny_pddpm(patch_stride=6)  # starts 0, 6, 12, 18, 24: 25 boxes of 12 (last 8) px
    assert model.num_boxes == 25
    values = [-1.0 + 0.08 * k for k in range(25)]
    model.unet = FakeNet(lambda k, inp: torch.full_like(inp, values[k]))
    rec = model.reconstruct(torch.rand(1, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    # pixel (13, 1) lies in the boxes of rows starting at 6 and 12 (row index 1, 2) and column start 0 (index 0)
    expected = ((values[5] + 1) / 2 + (values[10] + 1) / 2) / 2
    assert float(rec[0, 0, 13, 1]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("inference", [InferenceSetting(sampler="strided", noise_level=499, steps=1),
                                       InferenceSetting(sampler="strided", noise_level=30, steps=3),
                                       InferenceSetting(sampler="ddim", noise_level=10, steps=2),
                                       InferenceSetting(sampler="ddpm", noise_level=2)],
                         ids=["reference", "strided3", "ddim2", "ddpm3"])
def test_a_patch_pass_changes_only_its_box_and_always_shows_the_network_clean_context(
        inference: InferenceSetting) -> None:
    model = tiny_pddpm(noise=GAUSSIAN)
    calls = record_unet_inputs(model)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(9))
    field = GAUSSIAN.sample(x, inference.noise_level, generator=torch.Generator().manual_seed(1))
    k = 4  # the centre box, rows and columns 12..23
    out = model.patch_pass(x, k, field, generator=torch.Generator().manual_seed(2), inference=inference)
    box = model.boxes[k].expand_as(x)
    assert torch.equal(out[~box], x[~box])
    assert not torch.allclose(out[box], x[box], atol=1e-3)
    assert len(calls) == inference.network_calls
    assert [int(t[0]) for _, t in calls] == inference.timesteps
    for x_in, _t in calls:
        assert torch.equal(x_in[~box], (2.0 * x - 1.0)[~box])


@pytest.mark.parametrize(("overrides", "inference", "expected"), [
    ({}, None, 9),
    ({}, InferenceSetting(sampler="strided", noise_level=40, steps=3), 27),
    ({}, InferenceSetting(sampler="ddpm", noise_level=4), 45),
    ({"patch_stride": 6}, None, 25),
    ({"patch_size": 32}, InferenceSetting(sampler="ddim", noise_level=20, steps=2), 2),
], ids=["reference", "strided3", "ddpm5", "overlap", "one_box"])
def test_network_calls_equal_the_unet_forward_calls(overrides: dict[str, Any], inference: InferenceSetting | None,
                                                    expected: int) -> None:
    model = tiny_pddpm(**overrides)
    calls = record_unet_inputs(model)
    model.get_anomaly(torch.rand(3, 1, 32, 32), generator=torch.Generator().manual_seed(0), inference=inference)
    assert len(calls) == model.network_calls(inference) == expected


def test_maps_do_not_depend_on_the_rest_of_the_batch() -> None:
    model = tiny_pddpm()
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(10))
    full = model.get_anomaly(x, generator=torch.Generator().manual_seed(3)).anomaly_map
    alone = model.get_anomaly(x[:1], generator=torch.Generator().manual_seed(3)).anomaly_map
    torch.testing.assert_close(alone, full[:1], atol=1e-6, rtol=1e-5)  # one draw per image: same field
    changed = x.clone()
    changed[1:] = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(11))
    multi = InferenceSetting(sampler="strided", noise_level=20, steps=3)
    a = model.get_anomaly(x, generator=torch.Generator().manual_seed(3), inference=multi).anomaly_map
    b = model.get_anomaly(changed, generator=torch.Generator().manual_seed(3), inference=multi).anomaly_map
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-5)


def test_eps_is_the_noise_implied_by_the_x0_prediction() -> None:
    model = tiny_pddpm()
    x_t = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(12))
    t = torch.tensor([100, 499])
    x0 = model.predict_sample(x_t, t)
    eps = model.eps(x_t, t)
    for i in range(2):
        back = predict_x0(x_t[i], eps[i], float(model.alphas_cumprod[t[i]]), None)
        torch.testing.assert_close(back, x0[i], atol=1e-4, rtol=1e-4)


def test_state_dict_holds_only_the_unet() -> None:
    model = tiny_pddpm()
    assert model.state_dict() and all(k.startswith("unet.") for k in model.state_dict())
    tiny_pddpm(patch_size=8).load_state_dict(model.state_dict(), strict=True)  # the grid is not in the weights


def test_cosine_schedule_is_the_closed_form() -> None:
    model = tiny_pddpm()
    s = 0.008

    def f(t: float) -> float:
        return math.cos((t / 1000 + s) / (1 + s) * math.pi / 2) ** 2

    for t in (0, 124, 499, 900):  # abar_t = f(t + 1) / f(0) while no beta is clipped at 0.999
        assert model.schedule.abar(t) == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert model.scheduler.prediction_type == "sample"


# ------------------------------------------------------------------------------------------------- options, configs
@pytest.mark.parametrize(("overrides", "match"), [
    ({"val_inference": InferenceSetting(sampler="ddim", noise_level=10, steps=2)}, "val_inference must be null"),
    ({"patch_stride": 13}, r"patch_stride=13 must be in \[1, patch_size=12\]"),
    ({"patch_size": 40}, r"patch_size=40 must be in \[1, image_size=32\]"),
    ({"inference": InferenceSetting(sampler="ddpm", noise_level=300),
      "schedule": ScheduleSetting(num_train_timesteps=250, beta_schedule="cosine")}, r"noise_level=300"),
])
def test_bad_options_are_rejected(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_pddpm(**overrides)


def test_wrong_image_size_and_yaml_mistakes_are_reported() -> None:
    with pytest.raises(ValueError, match="built for 32x32 images"):
        tiny_pddpm().get_anomaly(torch.rand(1, 1, 64, 64))
    block = {"module_name": "model_zoo.pddpm", "class_name": "PatchedDDPM",
             "params": {"image_size": 32, "schedule": {"beta_schedule": "sigmoid"}}}
    with pytest.raises(ConfigError, match=r"model\.params\.schedule\.beta_schedule: 'sigmoid' is not one of"):
        build(block, "model", base=AnomalyModel)


def test_reference_config_builds_the_reference_model() -> None:
    config = load_config(CONFIGS / "pddpm.yaml")
    assert config["data"]["params"]["target_size"] == [128, 128] and config["data"]["params"]["batch_size"] == 16
    assert config["trainer"]["params"]["monitor"] == "box_l1"
    model = build(config["model"], "model", base=AnomalyModel)
    assert isinstance(model, PatchedDDPM)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(86.87, abs=0.01)
    assert model.schedule_setting.beta_schedule == "cosine" and model.num_train_timesteps == 1000
    assert model.noise == DiffusionNoise(noise_type="simplex", frequency=64.0)
    assert model.inference == InferenceSetting(sampler="strided", noise_level=499, steps=1)
    assert model.network_calls() == 9 and model.num_boxes == 9
    assert model.inference_label() == ("simplex noise, 9 patch passes (box 48 px, stride 48), each: one x0 "
                                       "prediction at t=499; 9 network calls in all")


def test_cpu_config_builds_the_small_model() -> None:
    config = load_config(CONFIGS / "pddpm_cpu.yaml")
    assert config["data"]["params"]["target_size"] == [64, 64]
    model = build(config["model"], "model", base=AnomalyModel)
    assert isinstance(model, PatchedDDPM) and model.image_size == 64
    assert grid_starts(64, model.patch_size, model.patch_stride) == [0, 24, 48]
    assert model.num_train_timesteps == 250 and model.inference.noise_level == 124
    assert model.noise.frequency == 32.0 and model.network_calls() == 9
    assert sum(p.numel() for p in model.parameters()) < 1.5e6


# ------------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_short_training_separates_hypointense_lesions() -> None:
    """200 steps on 32x32 embedded slices (~30 s on one core): the box loss falls and the 3x3 grid of one-shot patch
    passes scores hypointense lesion pixels above brain tissue (pooled pixel AUROC 0.89 when written)."""
    torch.manual_seed(0)
    config = load_config(CONFIGS / "_base" / "embedded_data.yaml",
                         ["data.params.target_size=[32, 32]", "data.params.batch_size=16"])
    data = build(config["data"], "data", base=DataModule)
    network = UNetSetting(channels=(16, 32, 32), attention_levels=(False, False, True), num_head_channels=32,
                          norm_num_groups=8, use_flash_attention=True)
    # the CPU variant's choices at 32 px: T = 250 (test step 124), 12 px boxes, simplex divisor 16
    model = PatchedDDPM(image_size=32, patch_size=12, network=network,
                        schedule=ScheduleSetting(num_train_timesteps=250, beta_schedule="cosine"),
                        noise=DiffusionNoise(noise_type="simplex", frequency=16.0),
                        inference=InferenceSetting(sampler="strided", noise_level=124, steps=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses: list[float] = []
    epoch = 0
    while len(losses) < 200:
        for batch in data.train_dataloader(seed=epoch):
            loss = model.training_losses(batch)["box_l1"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) >= 200:
                break
        epoch += 1
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.5 * first, f"box loss did not go down: {first:.4f} -> {last:.4f}"

    hypointense_separation(model, data).check("pDDPM, 200 steps at 32x32", min_pixel=0.8)
