"""The inference-step sweep on a tiny untrained DDPM: rows, network-call counts, the evaluation package's metrics,
table, CSV and plot."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from core.evaluation import DownstreamEvaluator, evaluate
from dl_utils.reinit import randomize_zero_layers
from model_zoo.diffusion.settings import InferenceSetting, UNetSetting
from tests.core.evaluation.fakes import FakeData
from tests.smoke_data import SMOKE_OVERRIDES
from tools import step_sweep as sw

CPU = torch.device("cpu")
CHANNELS = (8, 16, 16)


def _tiny_model(noise_level: int = 12) -> sw.DDPM:
    chain = InferenceSetting(sampler="ddpm", noise_level=noise_level)
    network = UNetSetting(channels=CHANNELS, attention_levels=(False, True, True), num_head_channels=CHANNELS[-1],
                          norm_num_groups=8, use_flash_attention=True)
    torch.manual_seed(0)
    model = sw.DDPM(network=network, inference=chain, val_inference=chain)
    randomize_zero_layers(model)
    return model


def test_sweep_on_a_tiny_untrained_model_produces_the_table(tmp_path, one_thread):
    model = _tiny_model()
    settings = sw.default_settings(model.inference.noise_level, steps=(3, 5, 50), full_seeds=2)
    assert [s.label for s in settings] == ["ddpm (full chain)"] * 2 + ["strided 3", "strided 5", "ddim 3", "ddim 5"]
    result = sw.sweep(model, FakeData(), settings, device=CPU, n_boot=20)
    rows = result["rows"]
    assert [r["network_evals"] for r in rows] == [13, 13, 3, 5, 3, 5]  # counted by a hook on the UNet
    for row in rows:
        assert 0.0 <= row["auroc"] <= 1.0 and 0.0 <= row["auprc"] <= 1.0 and row["s_per_image"] > 0
        assert 0.0 <= row["image_auroc"] <= 1.0 and set(row) >= {"auroc/lesions", "auroc/boxes", "dice"}
        assert row["auroc_mean_over_sets"] == pytest.approx((row["auroc/lesions"] + row["auroc/boxes"]) / 2)
    assert result["sets"] == ["lesions", "boxes"] and result["n_images"] == 6 + 5
    assert rows[0]["auroc"] != rows[1]["auroc"]  # the full chain's seeds differ: the seed noise is not vacuous
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
    data = FakeData()
    row, inferences = sw.run_setting(model, data, sw.Setting(strided, seed=1), device=CPU, datasets=["lesions"])
    assert model.inference == before and row["network_evals"] == 3 and row["method"] == "strided"
    generator = torch.Generator().manual_seed(1)  # the dataset's own generator, seeded with the setting's seed
    direct = torch.cat([model.get_anomaly(b.image, generator=generator, inference=strided).anomaly_map
                        for b in data.eval_dataloader("lesions")])
    assert [inf.name for inf in inferences] == ["lesions"] and torch.equal(inferences[0].anomaly_map, direct)
    region = inferences[0].evaluation_region()
    assert torch.equal(region, (inferences[0].brain_mask + inferences[0].anomaly_mask).clamp(max=1))
    assert region[0, 0, 0, 0] == 0 and bool((region[inferences[0].anomaly_mask > 0] == 1).all())
    with pytest.raises(ValueError, match="steps=11"):
        sw.Setting(InferenceSetting(sampler="strided", noise_level=6, steps=11))
    with pytest.raises(ValueError, match="healthy set 'nope' is not a test set"):
        sw.run_setting(model, data, sw.Setting(strided), device=CPU, healthy="nope")


def test_same_seed_gives_the_same_maps_and_another_seed_other_maps(one_thread):
    model = _tiny_model(noise_level=6)
    strided = InferenceSetting(sampler="strided", noise_level=6, steps=3)
    _, first = sw.run_setting(model, FakeData(), sw.Setting(strided, seed=1), device=CPU, datasets=["lesions"])
    _, second = sw.run_setting(model, FakeData(), sw.Setting(strided, seed=1), device=CPU, datasets=["lesions"])
    _, other = sw.run_setting(model, FakeData(), sw.Setting(strided, seed=2), device=CPU, datasets=["lesions"])
    assert torch.equal(first[0].anomaly_map, second[0].anomaly_map)
    assert not torch.equal(first[0].anomaly_map, other[0].anomaly_map)


def test_sweep_metrics_equal_what_the_evaluation_package_reports_for_the_same_setting(one_thread):
    model = _tiny_model(noise_level=6)
    strided = InferenceSetting(sampler="strided", noise_level=6, steps=3)
    row, _ = sw.run_setting(model, FakeData(), sw.Setting(strided, seed=2), device=CPU, datasets=["lesions"])
    network = UNetSetting(channels=CHANNELS, attention_levels=(False, True, True), num_head_channels=CHANNELS[-1],
                          norm_num_groups=8, use_flash_attention=True)
    configured = sw.DDPM(network=network, inference=strided, val_inference=strided)  # the setting as configured
    configured.load_state_dict(model.state_dict(), strict=True)
    metrics = evaluate(configured, FakeData(), {
        "segmentation": DownstreamEvaluator(task="segmentation", datasets=["lesions"], threshold=0.1),
        "detection": DownstreamEvaluator(task="detection", datasets=["lesions"]),
    }, device=CPU, seed=2)
    seg = metrics["segmentation"]["lesions"]
    assert 0.0 < seg["auroc_pooled"] < 1.0
    assert row["auroc/lesions"] == seg["auroc_pooled"]
    assert (row["auroc"], row["auprc"]) == (seg["auroc_pooled"], seg["auprc_pooled"])  # one set: pooled = per set
    assert row["image_auroc"] == metrics["detection"]["all_pathological"]["auroc"]


def test_a_wrong_network_call_count_is_an_error(one_thread, monkeypatch):
    model = _tiny_model(noise_level=6)
    strided = InferenceSetting(sampler="strided", noise_level=6, steps=3)
    monkeypatch.setattr(model, "network_calls", lambda inference=None: 4)
    with pytest.raises(RuntimeError, match="strided 3: 3 network calls counted, the setting says 4"):
        sw.run_setting(model, FakeData(), sw.Setting(strided), device=CPU, datasets=["lesions"])


def test_first_images_keeps_the_first_images_of_every_set():
    data = sw.FirstImages(FakeData(), 3)
    batches = list(data.eval_dataloader("lesions"))
    full = FakeData().eval_dataloader("lesions")[0]
    assert [len(b) for b in batches] == [3] and data.test_set_names == FakeData().test_set_names
    assert torch.equal(batches[0].image, full.image[:3]) and torch.equal(batches[0].anomaly_mask, full.anomaly_mask[:3])
    assert torch.equal(batches[0].brain_mask, full.brain_mask[:3]) and list(batches[0].path) == list(full.path[:3])
    assert [len(b) for b in sw.FirstImages(FakeData(), 5).eval_dataloader("lesions")] == [4, 1]
    with pytest.raises(ValueError, match="max_images must be >= 1"):
        sw.FirstImages(FakeData(), 0)


def test_train_mode_trains_the_config_as_main_does_then_sweeps_it(tmp_path, one_thread):
    # no --checkpoint: ddpm_cpu.yaml (smoke-sized data, a tiny network, 2 steps) trains through core/Main.py's
    # Trainer.fit in a run folder, and the sweep evaluates that run's best.pt
    tiny = ["model.params.network={channels: [8, 16, 16], num_head_channels: 16, norm_num_groups: 8}",
            "model.params.inference={sampler: ddpm, noise_level: 6}", "model.params.val_inference=null",
            "trainer.params.max_steps=2", "trainer.params.max_epochs=1", *SMOKE_OVERRIDES]
    out = tmp_path / "sweep"
    code = sw.main([*(a for value in tiny for a in ("--set", value)), "--steps", "3", "--full-seeds", "1",
                    "--max-images", "2", "--out-dir", str(out), "--threads", "1"])
    assert code == 0
    (best,) = (out / "train").glob("*/*/*/checkpoints/best.pt")
    saved = torch.load(best, weights_only=True)
    assert saved["step"] == 2 and set(saved["optimizers"]) == {"model"}  # a real Trainer.fit checkpoint
    result = json.loads((out / "anoddpm" / "step_sweep.json").read_text())
    assert result["provenance"]["checkpoint"] == str(best)
    assert [row["network_evals"] for row in result["rows"]] == [7, 3, 3]  # full chain L=6, strided 3, ddim 3
    # a second training into the same folder returns its own run's weights, not the earlier run's
    again = sw.train_with_main(sw.DEFAULT_CONFIG, [*tiny, "trainer.params.max_steps=1"], out / "train")
    assert again != best and torch.load(again, weights_only=True)["step"] == 1
