"""Importer of the predecessor's MONAI-generative DDPM checkpoints."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch
import yaml

from core.Configurator import build, load_config
from dl_utils.checkpoint import load_model_weights
from model_zoo.base import AnomalyModel
from model_zoo.ddpm import DDPM
from tools.import_checkpoint import CheckpointImportError, convert_state_dict, import_checkpoint, main

NETWORK = {"channels": [8, 16, 16], "attention_levels": [False, True, True], "num_head_channels": 8,
           "norm_num_groups": 8}
MODEL_PARAMS = {"network": NETWORK, "inference": {"sampler": "ddpm", "noise_level": 3},
                "val_inference": {"sampler": "ddim", "noise_level": 3, "steps": 2}}


pytestmark = pytest.mark.usefixtures("one_thread_module")


def reference_model() -> DDPM:
    """The model whose weights the old file holds; its attention output projections are identity, as the old
    attention (which never applied ``proj_attn``) computed."""
    torch.manual_seed(0)
    model = build({"module_name": "model_zoo.ddpm", "class_name": "DDPM", "params": MODEL_PARAMS}, "model").eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("attn.out_proj"):
                module.weight.copy_(torch.eye(module.weight.shape[0]))
                module.bias.zero_()
    return model


def to_old_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reverse of the importer's renaming: MONAI names -> MONAI-generative names, with random proj_attn."""
    old = {}
    g = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith(("attn.out_proj.weight", "attn.out_proj.bias")):
            stem = key.replace("attn.out_proj", "proj_attn")
            old[stem] = torch.randn(value.shape, generator=g)  # stored but never applied by the old model
            continue
        key = re.sub(r"\.attn\.(to_q|to_k|to_v)\.", r".\1.", key)
        key = re.sub(r"(upsampler)\.postconv\.", r"\1.conv.", key)
        old[key] = value.clone()
    return old


def write_old_checkpoint(path: Path, model: DDPM, **extra: object) -> None:
    weights = to_old_names(model.state_dict())
    weights["lpips.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)  # LPIPS junk, dropped
    weights["lpips.lin0.model.1.weight"] = torch.randn(1, 64, 1, 1)
    torch.save({"model_weights": weights, "optimizer_weights": {"state": {}, "param_groups": []}, "epoch": 7,
                **extra}, path)


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "ddpm_tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "ddpm_tiny", "model": {
        "module_name": "model_zoo.ddpm", "class_name": "DDPM", "params": MODEL_PARAMS}}))
    return path


def test_old_names_are_what_the_importer_expects() -> None:
    old = to_old_names(reference_model().state_dict())
    assert "unet.down_blocks.1.attentions.0.to_q.weight" in old
    assert "unet.middle_block.attention.to_k.bias" in old
    assert "unet.up_blocks.0.upsampler.conv.conv.weight" in old
    assert "unet.down_blocks.1.attentions.0.proj_attn.weight" in old
    assert not any(".attn." in k or "postconv" in k for k in old)


def test_convert_rename_report() -> None:
    model = reference_model()
    old = to_old_names(model.state_dict())
    old["lpips.net.slice1.0.weight"] = torch.zeros(1)
    new, report = convert_state_dict({f"module.{k}": v for k, v in old.items()})  # DDP prefix stripped
    assert set(new) == set(model.state_dict())
    assert report["dropped_prefixes"] == {"lpips": 1}
    n_attention = sum(1 for k in model.state_dict() if k.endswith("attn.out_proj.weight"))
    assert len(report["identity_out_proj"]) == n_attention == report["ignored_proj_attn"] // 2 == 7
    assert torch.equal(new["unet.middle_block.attention.attn.out_proj.weight"], torch.eye(16))


def test_cli_converts_loads_strictly_and_reproduces_outputs(tmp_path: Path, config_path: Path) -> None:
    reference = reference_model()
    src, out = tmp_path / "old.pt", tmp_path / "new.pt"
    write_old_checkpoint(src, reference)
    assert main(["--src", str(src), "--out", str(out), "--config", str(config_path)]) == 0
    state = torch.load(out, map_location="cpu", weights_only=True)
    assert set(state) == {"model", "config", "source"}
    assert state["config"] == load_config(config_path)
    assert state["source"]["epoch"] == 7 and state["source"]["dropped_prefixes"] == {"lpips": 2}
    assert len(state["source"]["sha256"]) == 64
    model = build(state["config"]["model"], "model", base=AnomalyModel).eval()
    model.load_state_dict(state["model"], strict=True)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        assert torch.equal(model.eps(x, t), reference.eps(x, t))
    # the project's own loader reads the file too
    fresh = build(state["config"]["model"], "model", base=AnomalyModel)
    assert "model weights" in load_model_weights(fresh, out)


def test_mismatched_config_names_the_config_and_keys(tmp_path: Path, config_path: Path) -> None:
    src = tmp_path / "old.pt"
    write_old_checkpoint(src, reference_model())
    with pytest.raises(CheckpointImportError, match=r"ddpm_tiny\.yaml.*channels"):
        import_checkpoint(src, tmp_path / "new.pt", config_path, ["model.params.network.channels=[8,16,32]"])
    assert not (tmp_path / "new.pt").exists()


def test_pickled_objects_are_refused_with_an_explanation(tmp_path: Path, config_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "old_with_args.pt"
    write_old_checkpoint(src, reference_model(), args=argparse.Namespace(lr=1e-4))
    assert main(["--src", str(src), "--out", str(tmp_path / "new.pt"), "--config", str(config_path)]) == 1
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "re-save its tensors" in err and str(src) in err
    with pytest.raises(CheckpointImportError, match="file not found"):
        import_checkpoint(tmp_path / "missing.pt", tmp_path / "new.pt", config_path)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointImportError, match="expected a dict with 'model_weights'"):
        import_checkpoint(tmp_path / "other.pt", tmp_path / "new.pt", config_path)
