"""The inference-step sweep on a tiny untrained DDPM: rows, network-call counts, table, CSV and plot."""

from __future__ import annotations

import csv

import pytest
import torch

from data.batch import Batch
from dl_utils.reinit import randomize_zero_layers
from model_zoo.diffusion.settings import InferenceSetting
from tools import step_sweep as sw

CPU = torch.device("cpu")


def _sets(n: int = 2, size: int = 16) -> list[sw.EvalSet]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for name in ("bright", "dark"):
        images = torch.rand(n, 1, size, size, generator=generator) * 0.5
        masks = torch.zeros(n, 1, size, size)
        masks[:, :, 4:8, 4:8] = 1
        images = torch.where(masks > 0, torch.full_like(images, 1.0 if name == "bright" else 0.0), images)
        region = torch.zeros_like(masks)
        region[:, :, 1:-1, 1:-1] = 1
        out.append(sw.EvalSet(name=name, images=images, masks=masks, region=region))
    return out


def _tiny_model(noise_level: int = 12) -> sw.DDPM:
    model = sw.small_ddpm(channels=(8, 16, 16), noise_level=noise_level)
    randomize_zero_layers(model)
    return model


def test_sweep_on_a_tiny_untrained_model_produces_the_table(tmp_path, one_thread):
    model = _tiny_model()
    settings = sw.default_settings(model.inference.noise_level, steps=(3, 5, 50), full_seeds=2)
    assert [s.label for s in settings] == ["ddpm (full chain)"] * 2 + ["strided 3", "strided 5", "ddim 3", "ddim 5"]
    result = sw.sweep(model, _sets(), settings, device=CPU, batch_size=3, n_boot=20)
    rows = result["rows"]
    assert [r["network_evals"] for r in rows] == [13, 13, 3, 5, 3, 5]  # counted by a hook on the UNet
    for row in rows:
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["auprc"] <= 1.0 and row["s_per_image"] > 0
    assert result["n_images"] == 4
    assert result["noise"]["n_seeds"] == 2 and all(r["tolerance_auroc"] >= 0 for r in rows)
    assert result["recommendation"] in {r["setting"] for r in rows}
    within = [r for r in rows if r["within_noise"]]
    assert result["recommendation"] == min(within, key=lambda r: (r["network_evals"], r["s_per_image"]))["setting"]

    table = sw.markdown_table(result)
    assert table.startswith("| setting | seed | network evals |") and "Recommendation" in table
    assert table.count("\n| ") == len(rows)  # one line per row after the header and the separator
    paths = sw.write_outputs(result, tmp_path)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths.values())
    with paths["csv"].open() as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(rows) and read[0]["setting"] == "ddpm (full chain)"


def test_settings_are_passed_per_call_and_never_change_the_model(one_thread):
    model = _tiny_model(noise_level=6)
    before = model.inference
    strided = InferenceSetting(sampler="strided", noise_level=6, steps=3)
    row, maps = sw.run_setting(model, _sets(n=1), sw.Setting(strided, seed=1), device=CPU)
    assert model.inference == before and row["network_evals"] == 3 and row["method"] == "strided"
    x = _sets(n=1)[0].images
    direct = model.get_anomaly(x, generator=torch.Generator().manual_seed(1), inference=strided).anomaly_map
    assert torch.equal(maps[0], direct)
    with pytest.raises(ValueError, match="steps=11"):
        sw.Setting(InferenceSetting(sampler="strided", noise_level=6, steps=11))


def test_same_seed_gives_the_same_maps(one_thread):
    model = _tiny_model(noise_level=6)
    sets = _sets(n=1)
    strided = sw.Setting(InferenceSetting(sampler="strided", noise_level=6, steps=3), seed=1)
    _, first = sw.run_setting(model, sets, strided, device=CPU)
    _, second = sw.run_setting(model, sets, strided, device=CPU)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


class _FakeInfo:
    def __init__(self, has_mask: bool) -> None:
        self.has_anomaly_mask = has_mask


class _FakeData:
    """DataModule stand-in: one healthy and two pathological sets of [1,1,8,8] images."""

    test_set_names = ("healthy", "lesion_a", "lesion_b")

    def dataset_info(self, name: str) -> _FakeInfo:
        return _FakeInfo(name != "healthy")

    def eval_dataloader(self, name: str) -> list[Batch]:
        mask = torch.zeros(2, 1, 8, 8)
        mask[:, :, 2:4, 2:4] = 1
        brain = torch.zeros(2, 1, 8, 8)
        brain[:, :, 1:7, 1:7] = 1
        return [Batch(image=torch.rand(2, 1, 8, 8), anomaly_mask=mask, brain_mask=brain)] * 2


def test_load_eval_sets_keeps_pathological_sets_with_a_brain_or_lesion_region():
    sets = sw.load_eval_sets(_FakeData(), max_images=3)
    assert [s.name for s in sets] == ["lesion_a", "lesion_b"]
    assert sets[0].images.shape == (3, 1, 8, 8)
    assert torch.equal(sets[0].region, sets[0].region.maximum(sets[0].masks))
    assert sets[0].region[0, 0, 0, 0] == 0 and sets[0].region[0, 0, 2, 2] == 1
