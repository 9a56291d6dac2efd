"""tools.gpu_check: the plan per machine, failure handling, and the --smoke run end to end on the CPU."""

import json
from pathlib import Path

import pytest

from tools import gpu_check


def _names(steps):
    return [s.name for s in steps]


def test_the_cuda_plan_covers_every_target_and_ddp_only_with_two_gpus(tmp_path):
    one = gpu_check.plan(out=tmp_path, smoke=False, steps=200, gpus=1)
    two = gpu_check.plan(out=tmp_path, smoke=False, steps=200, gpus=2)
    assert _names(one) == ["benchmark", "benchmark_cuda_graphs", "quickstart",
                           *[f"train_{f}" for f in gpu_check.FAMILIES]]
    assert _names(two) == [*_names(one), "ddp"]
    bench = one[0].command
    assert bench[bench.index("--device") + 1] == "cuda" and "--compile" in bench and "--smoke" not in bench
    assert "reduce-overhead" in one[1].command
    for step in one[3:]:
        assert "trainer.params.max_steps=200" in step.command and step.command[step.command.index(
            "--config_path") + 1].endswith(f"{step.name.removeprefix('train_')}.yaml")


def test_the_smoke_plan_runs_the_same_steps_on_the_cpu_configs(tmp_path):
    steps = gpu_check.plan(out=tmp_path, smoke=True, steps=200, gpus=4)
    assert _names(steps) == ["benchmark", "quickstart", *[f"train_{f}" for f in gpu_check.FAMILIES]]
    assert steps[0].command[steps[0].command.index("--device") + 1] == "cpu" and "--smoke" in steps[0].command
    for step in steps[2:]:
        assert step.command[step.command.index("--config_path") + 1].endswith("_cpu.yaml")
        assert Path(step.command[step.command.index("--config_path") + 1]).is_file()


def test_the_first_failing_step_stops_the_check_and_both_files_are_written(tmp_path, monkeypatch):
    ran = []

    def fake(step, *, env):
        ran.append(step.name)
        status = "failed" if step.name == "quickstart" else "ok"
        return gpu_check.StepResult(name=step.name, command=step.command, rc=1 if status == "failed" else 0,
                                    wall_s=1.0, status=status, tail=["Traceback", "boom"])

    monkeypatch.setattr(gpu_check, "run_step", fake)
    assert gpu_check.check(out=tmp_path, smoke=True, steps=2) == 1
    assert ran == ["benchmark", "quickstart"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    statuses = {s["name"]: s["status"] for s in report["steps"]}
    assert statuses["quickstart"] == "failed" and statuses["train_ddpm"] == "skipped"
    assert "| quickstart | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_the_budget_cuts_timeouts_and_leaves_later_steps_unstarted(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    timeouts = {}

    def fake(step, *, env):
        timeouts[step.name] = step.timeout_s
        clock["now"] += 50.0
        return gpu_check.StepResult(name=step.name, command=step.command, rc=0, wall_s=50.0, status="ok")

    monkeypatch.setattr(gpu_check, "run_step", fake)
    monkeypatch.setattr(gpu_check.time, "monotonic", lambda: clock["now"])
    assert gpu_check.check(out=tmp_path, smoke=True, steps=2, budget_s=130) == 1
    # 130 s: benchmark (timeout 120 of 130 left), quickstart (cut to the 80 s left), one training (30 s left)
    assert timeouts == {"benchmark": 120, "quickstart": 80, "train_ae": 30}
    statuses = [s["status"] for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]]
    assert statuses == ["ok", "ok", "ok", *["no_time"] * (len(gpu_check.FAMILIES) - 1)]


def test_a_timeout_is_a_failure_with_the_output_so_far(tmp_path):
    import sys

    step = gpu_check.Step(name="slow", command=[sys.executable, "-c", "import time; print('started', flush=True); "
                                                "time.sleep(30)"], timeout_s=3)
    result = gpu_check.run_step(step, env={})
    assert result.status == "timeout" and result.rc is None and "started" in result.tail


def test_without_cuda_the_full_check_refuses_to_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "device_summary", lambda: {"torch": "x", "cuda": None, "gpus": 0})
    assert gpu_check.check(out=tmp_path, smoke=False, steps=2) == 2
    assert not (tmp_path / "gpu_check.json").exists()


def test_unknown_families_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--smoke", "--out", str(tmp_path), "--families", "ae", "gan"])
    assert exit_.value.code == 2 and "--families: gan not among" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_check_end_to_end(tmp_path):
    # Two families (a single-network and a diffusion trainer path): every _cpu config's training already runs in
    # tests/core/test_resume.py; the plan of all families is checked above.
    families = ["ae", "ddpm"]
    assert gpu_check.main(["--smoke", "--out", str(tmp_path), "--families", *families]) == 0, \
        (tmp_path / "gpu_check.md").read_text()
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert all(s["status"] == "ok" for s in report["steps"])
    bench = report["steps"][0]["result"]
    assert bench["training"]["plain"]["images_per_s"] > 0 and bench["training"]["fast"]["images_per_s"] > 0
    # every training step really trained: its run folder holds a checkpoint
    assert len(list((tmp_path / "runs").rglob("best.pt"))) == 1 + len(families)
    assert [s["name"] for s in report["steps"]] == ["benchmark", "quickstart", "train_ae", "train_ddpm"]
    assert "training images/s" in (tmp_path / "gpu_check.md").read_text()
