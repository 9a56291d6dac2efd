"""tools.thread_benchmark: the policy rule on hand-made numbers, the worker environment, one real measurement."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools import thread_benchmark as tb


def _row(config: str, policy: str, busy: int, train: float, infer: float) -> dict:
    return {"config": config, "policy": policy, "busy": busy, "train_images_per_s": train,
            "infer_images_per_s": infer, "threads": 1, "load_1min": 0.0}


def test_choose_policy_applies_both_halves_of_the_rule():
    rows = [
        # idle: torch best (100); passive 95 (within 10 %); one 60 and free 85 are not
        _row("a", "torch", 0, 100, 50), _row("a", "passive", 0, 95, 50), _row("a", "one", 0, 60, 30),
        _row("a", "free", 0, 85, 50),
        # one busy process: torch collapses below one thread; passive 96 % of one thread (within the 5 % noise)
        _row("a", "torch", 1, 20, 10), _row("a", "passive", 1, 57.6, 30), _row("a", "one", 1, 60, 30),
        _row("a", "free", 1, 60, 30),
    ]
    choice = tb.choose_policy(rows)
    assert choice["passing"] == ["passive"]
    assert choice["choice"] == "passive"
    assert any("idle" in why for why in choice["failures"]["free"])
    assert any("1 busy" in why for why in choice["failures"]["torch"])
    assert any("idle" in why for why in choice["failures"]["one"])
    # a slightly slower passive under contention (94 % of one thread) fails too: nothing passes
    rows[5] = _row("a", "passive", 1, 56.4, 30)
    assert tb.choose_policy(rows)["choice"] is None


def test_worker_environment_keeps_only_the_policys_thread_settings(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    env = tb.worker_environment(tb.POLICIES["torch"])
    assert "OMP_NUM_THREADS" not in env and "OMP_WAIT_POLICY" not in env
    assert tb.worker_environment(tb.POLICIES["passive"])["OMP_WAIT_POLICY"] == "PASSIVE"


def test_benchmark_starts_and_stops_the_busy_processes(monkeypatch):
    seen: list[int] = []
    started: list[subprocess.Popen] = []

    def fake_worker(configs, policy, *, seconds, timeout):
        seen.append(len([p for p in started if p.poll() is None]))
        return [{"train_images_per_s": 1.0, "infer_images_per_s": 2.0, "threads": 1} for _ in configs]

    real_start = tb.start_busy

    def start(n):
        processes = real_start(n)
        started.extend(processes)
        return processes

    monkeypatch.setattr(tb, "run_worker", fake_worker)
    monkeypatch.setattr(tb, "start_busy", start)
    result = tb.benchmark(configs=["x", "y"], policies=["one", "torch"], busy_levels=[0, 2], seconds=0.1,
                          settle_s=0.0)
    assert seen == [0, 0, 2, 2]  # busy processes run during the measurements of their level only
    assert all(p.poll() is not None for p in started)
    assert len(result["rows"]) == 8 and {r["busy"] for r in result["rows"]} == {0, 2}
    table = tb.markdown(result)
    assert table.count("| x | train |") == 2 and "chosen:" in table


@pytest.mark.slow
def test_one_real_measurement_in_a_worker_process():
    config = Path("projects/normative_eval/configs/quickstart.yaml")
    assert config.is_file()
    (entry,) = tb.run_worker(["quickstart"], tb.POLICIES["one"], seconds=0.0, timeout=600)
    assert entry["threads"] == 1
    assert entry["train_images_per_s"] > 0 and entry["infer_images_per_s"] > 0
