"""The performance benchmark: smoke run keys and numbers, fast-vs-plain parity, zero-layer re-initialisation."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from core.Configurator import build, load_config
from dl_utils.reinit import randomize_zero_layers
from tools import benchmark as bm

CPU = torch.device("cpu")


def _positive_numbers(entry: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = entry[key]
        assert isinstance(value, (int, float)) and value > 0, f"{key}={value!r}"


def test_smoke_benchmark_has_every_entry_with_positive_numbers(one_thread):
    config = bm.smoke_config("cpu", train_steps=1, train_warmup=1, loader_images=8, feature_images=2,
                             parity_images=1, fid_backend="random", perceptual_backend="random")
    result = bm.run_benchmark(config)
    json.dumps(result)  # JSON-able as written by the CLI
    assert {"meta", "training", "anoddpm", "autoddpm", "parity", "lpips", "fid_features", "loader",
            "peak_memory"} <= set(result)
    for path in ("plain", "fast"):
        entry = result["training"][path]
        assert {"device_name", "torch", "settings"} <= set(entry)
        assert entry["settings"]["name"] == path
        _positive_numbers(entry, ("images_per_s", "step_s_median", "peak_memory_mib"))
        for method in ("anoddpm", "autoddpm"):
            for batch in bm.SIZES["tiny"].infer_batches:
                inference = result[method][f"{path}_batch{batch}"]
                assert inference["torch"] == torch.__version__
                _positive_numbers(inference, ("s_per_image", "network_evals", "s_per_image_reference_chain_est"))
    assert result["anoddpm"]["plain_batch1"]["network_evals"] == bm.SMOKE_CHAINS.anoddpm_level + 1
    assert result["autoddpm"]["plain_batch1"]["network_evals"] == (3 + 1) + 2 * 2  # L_r + 1, then L_i * U
    assert result["training"]["plain"]["settings"]["flash_attention"] is False
    assert result["training"]["fast"]["settings"]["flash_attention"] is True
    _positive_numbers(result["training"], ("speedup_fast_over_plain",))
    _positive_numbers(result["lpips"], ("images_per_s",))
    _positive_numbers(result["fid_features"], ("images_per_s",))
    _positive_numbers(result["loader"], ("images_per_s", "first_epoch_images_per_s"))
    _positive_numbers(result["peak_memory"], ("peak_memory_mib",))
    assert result["parity"]["passed"] is True
    rows = bm.summary_rows(result)
    assert rows[0][0] == "training images/s" and len(rows) == 1 + 2 * len(bm.SIZES["tiny"].infer_batches)


def test_untrained_unet_is_randomised_so_parity_is_not_vacuous():
    spec, plain = bm.SIZES["tiny"], bm.path_settings("plain", CPU)
    x = torch.rand(2, 1, spec.image, spec.image)
    t = torch.full((2,), 5)
    model = bm.build_model(spec, plain, chains=bm.SMOKE_CHAINS)
    with torch.no_grad():
        assert model.eps(x, t).abs().max() > 1e-3  # MONAI's zero-initialised output conv was re-initialised
    fresh = build(spec.load()["model"], "model", base=bm.DDPM)  # the YAML's DDPM as a run builds it
    with torch.no_grad():
        assert fresh.eps(x, t).abs().max() == 0  # why the re-initialisation is needed
    assert randomize_zero_layers(fresh) > 0


def test_fast_path_matches_plain_path_in_float32(one_thread):
    fast = bm.path_settings("fast", CPU, channels_last="on")  # flash/SDPA attention and channels-last on the CPU
    assert fast.precision(CPU) == "float32"
    result = bm.anomaly_parity(spec=bm.SIZES["tiny"], fast=fast, device=CPU, chains=bm.SMOKE_CHAINS, n_images=2)
    assert result["passed"] is True
    for method in ("anoddpm", "autoddpm"):
        check = result[method]["map"]
        assert check["max_abs"] <= bm.PARITY_TOLERANCE["float32"]["max_abs"]
        assert check["map_mean"] > 0  # a non-empty map: the comparison means something


def test_bfloat16_fast_path_differs_but_stays_within_its_tolerance(one_thread):
    fast = replace(bm.path_settings("fast", CPU), autocast_dtype="bfloat16")
    assert fast.precision(CPU) == "bfloat16"
    chains = bm.Chains(anoddpm_level=10, autoddpm_levels=(8, 3, 2))
    result = bm.anomaly_parity(spec=bm.SIZES["tiny"], fast=fast, device=CPU, chains=chains, n_images=2)
    assert result["anoddpm"]["map"]["max_abs"] > 0  # bf16 really ran
    assert result["passed"] is True, result


def test_parity_check_rejects_different_maps():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 8, 8, generator=generator)
    assert bm.parity_check(a, a.clone(), precision="float32")["passed"] is True
    assert bm.parity_check(a, a + 2e-3, precision="float32")["passed"] is False
    other = torch.rand(2, 1, 8, 8, generator=generator)
    check = bm.parity_check(a, other, precision="bfloat16")
    assert check["passed"] is False and check["pearson"] < 0.95


def test_time_call_runs_warmup_then_repeats():
    calls = []
    times = bm.time_call(lambda: calls.append(1), device=CPU, warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_reference_size_is_the_methods_network():
    spec = bm.SIZES["reference"]
    network = spec.describe()["network"]
    assert (spec.image, network["channels"], network["attention_levels"], network["num_head_channels"],
            network["num_res_blocks"], spec.train_batch) == (128, [128, 256, 256], [False, True, True], 256, 1, 16)
    assert max(spec.infer_batches) >= 16 and min(spec.infer_batches) == 1
    assert bm.REFERENCE_CHAINS.anoddpm_calls == 251 and bm.REFERENCE_CHAINS.autoddpm_calls == 201 + 50 * 5


def test_sizes_are_the_shipped_yaml_and_build_the_network_a_run_builds():
    small = bm.SIZES["small"]
    shipped = load_config(bm.REPO_ROOT / "projects/normative_eval/configs/ddpm_cpu.yaml")
    built = bm.build_model(small, bm.path_settings("plain", CPU), chains=bm.SMOKE_CHAINS)
    run_model = build(shipped["model"], "model", base=bm.DDPM)
    assert small.image == shipped["data"]["params"]["target_size"][0]
    shapes = {k: v.shape for k, v in run_model.state_dict().items()}
    assert {k: v.shape for k, v in built.state_dict().items()} == shapes
    assert bm.SIZES["tiny"].describe()["network"]["channels"] == [16, 32, 32]


def test_make_trainer_builds_a_step_only_trainer_whose_step_trains(tmp_path, one_thread):
    spec, plain = bm.SIZES["tiny"], bm.path_settings("plain", CPU)
    trainer, batch = bm.make_trainer(spec=spec, path=plain, device=CPU, run_dir=tmp_path)
    shipped = spec.load()["trainer"]["params"]
    assert trainer.ema is not None and trainer.ema_options.decay == shipped["ema_decay"]  # the YAML's trainer
    assert trainer.data is None and trainer.run.logger is None and trainer.model.training
    assert batch.image.shape == (spec.train_batch, 1, spec.image, spec.image)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    terms = trainer.training_step(batch)
    assert math.isfinite(float(terms["loss"])) and trainer.groups.optimizers["model"].state  # Adam took a step
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    with pytest.raises(ValueError, match="needs data and logger"):
        trainer.fit()
