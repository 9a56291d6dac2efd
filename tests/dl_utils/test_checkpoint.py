"""Checkpoint files: atomic save, safe load, strict weight loading, RNG states."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dl_utils import checkpoint as ckpt
from dl_utils.errors import UserError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.BatchNorm2d(2)


def test_save_is_atomic_and_loads_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "latest.pt"
    state = {"model": Net().state_dict(), "ema": None, "epoch": 3, "step": 17, "best_metric": 0.25,
             "rng": [ckpt.capture_rng_state()], "config": {"name": "x", "size": (128, 128)}}
    assert ckpt.save_checkpoint(path, state) == path
    assert [p.name for p in path.parent.iterdir()] == ["latest.pt"]  # no temporary file left behind
    loaded = torch.load(path, weights_only=True)
    assert loaded["step"] == 17 and loaded["config"] == {"name": "x", "size": (128, 128)}
    assert torch.equal(loaded["model"]["conv.weight"], state["model"]["conv.weight"])
    ckpt.save_checkpoint(path, {**state, "step": 18})  # replaces the previous file
    assert ckpt.load_checkpoint(path)["step"] == 18


def test_load_checkpoint_names_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint not found: .*absent\.pt"):
        ckpt.load_checkpoint(tmp_path / "absent.pt")
    good = tmp_path / "good.pt"
    ckpt.save_checkpoint(good, {"model": Net().state_dict()})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ckpt.CheckpointError, match=r"cannot read checkpoint .*truncated\.pt"):
        ckpt.load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ckpt.CheckpointError, match=r"garbage\.pt"):
        ckpt.load_checkpoint(garbage)


def test_a_full_disk_names_the_checkpoint_and_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "latest.pt"
    ckpt.save_checkpoint(path, {"step": 1})

    def full_disk(obj: object, handle: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # what torch's writer raises, without a file name

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left") as info:
        ckpt.save_checkpoint(path, {"step": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("text", ["epoch: 3\nweights: none\n", "e", "{}\n"])
def test_a_text_file_is_a_checkpoint_error_naming_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "weights.txt"
    path.write_text(text)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot read checkpoint .*weights\.txt \(not a torch checkpoint"):
        ckpt.load_checkpoint(path)
    assert isinstance(ckpt.CheckpointError("x"), UserError)


def test_load_model_weights_is_strict_and_lists_the_keys(tmp_path: Path) -> None:
    weights = Net().state_dict()
    missing = tmp_path / "missing.pt"
    ckpt.save_checkpoint(missing, {"model": {k: v for k, v in weights.items() if k != "norm.bias"}})
    with pytest.raises(ckpt.CheckpointError, match=r"missing\.pt.*missing keys \(1\): norm\.bias"):
        ckpt.load_model_weights(Net(), missing)
    extra = tmp_path / "extra.pt"
    ckpt.save_checkpoint(extra, {"model": {**weights, "head.weight": torch.zeros(1)}})
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected keys \(1\): head\.weight"):
        ckpt.load_model_weights(Net(), extra)
    shape = tmp_path / "shape.pt"
    ckpt.save_checkpoint(shape, {"model": {**weights, "conv.bias": torch.zeros(5)}})
    with pytest.raises(ckpt.CheckpointError, match=r"(?s)shape\.pt.*size mismatch for conv\.bias"):
        ckpt.load_model_weights(Net(), shape)
    no_weights = tmp_path / "empty.pt"
    ckpt.save_checkpoint(no_weights, {"config": {}})
    with pytest.raises(ckpt.CheckpointError, match=r"empty\.pt has no 'model' weights"):
        ckpt.load_model_weights(Net(), no_weights)


def test_load_model_weights_prefers_ema_and_accepts_importer_files(tmp_path: Path) -> None:
    live, ema = Net().state_dict(), Net().state_dict()
    full = tmp_path / "best.pt"
    ckpt.save_checkpoint(full, {"model": live, "ema": ema, "epoch": 2, "step": 40})
    net = Net()
    assert ckpt.load_model_weights(net, full) == f"EMA weights from {full} (epoch 2, step 40)"
    assert torch.equal(net.conv.weight, ema["conv.weight"])
    assert ckpt.load_model_weights(net, full, prefer_ema=False).startswith("model weights from")
    assert torch.equal(net.conv.weight, live["conv.weight"])
    imported = tmp_path / "imported.pt"
    ckpt.save_checkpoint(imported, {"model": ema, "config": {"model": {}}})
    assert ckpt.load_model_weights(net, imported) == f"model weights from {imported}"
    assert torch.equal(net.conv.weight, ema["conv.weight"])


def test_clone_state_dict_is_not_aliased() -> None:
    net = Net()
    copy = ckpt.clone_state_dict(net)
    with torch.no_grad():
        net.conv.weight.add_(1.0)
    assert not torch.equal(copy["conv.weight"], net.conv.weight)
    assert copy["conv.weight"].data_ptr() != net.conv.weight.data_ptr()


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = tmp_path / "rng.pt"
    ckpt.save_checkpoint(path, {"rng": ckpt.capture_rng_state()})
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    ckpt.restore_rng_state(ckpt.load_checkpoint(path)["rng"])
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], random.gauss(0, 1))
    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2:] == second[2:]
