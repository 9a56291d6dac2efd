"""tools.loader_benchmark.loader_throughput on a handful of files."""

from __future__ import annotations

import json

import pytest

from tools.loader_benchmark import loader_throughput, main


@pytest.mark.parametrize(("fmt", "cache"), [("png", "memory"), ("npy", "disk")])
def test_loader_throughput_reports_both_epochs(fmt: str, cache: str) -> None:
    result = loader_throughput(n=12, size=32, fmt=fmt, cache=cache, batch_size=5, native_shape=(40, 30))
    assert result["n"] == 12 and result["format"] == fmt and result["cache"] == cache
    for key in ("first_epoch_images_per_s", "cached_epoch_images_per_s", "first_epoch_s", "cached_epoch_s"):
        assert result[key] > 0
    assert result["first_epoch_images_per_s"] == pytest.approx(12 / result["first_epoch_s"], rel=0.05)


def test_cli_prints_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["--n", "4", "--size", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4
