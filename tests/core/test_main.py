"""The command line: dry runs of every shipped YAML, bad configs, and the quickstart end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.Main import main
from data.embedded import SMOKE_COUNTS
from tests.smoke_data import SMOKE_DATA
from tests.wandb_reader import find_run_file, read_run

REPO = Path(__file__).resolve().parents[2]
PROJECT_CONFIGS = sorted(p for p in (REPO / "projects").rglob("*.yaml") if "_base" not in p.parts
                         and "studies" not in p.parts)
BASE_FRAGMENTS = sorted(p for p in (REPO / "projects").rglob("_base/*.yaml"))
QUICKSTART = REPO / "projects" / "normative_eval" / "configs" / "quickstart.yaml"


def test_projects_have_configs():
    assert QUICKSTART in PROJECT_CONFIGS
    assert len(PROJECT_CONFIGS) >= 5


@pytest.mark.parametrize("path", BASE_FRAGMENTS, ids=lambda p: p.name)
def test_base_fragments_parse(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("path", PROJECT_CONFIGS, ids=lambda p: str(p.relative_to(REPO / "projects")))
def test_every_project_yaml_dry_runs(path, capsys):
    assert main(["--config_path", str(path), "--dry-run", "--log_level", "WARNING"]) == 0
    assert "dry run OK" in capsys.readouterr().out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(f"_base_: {QUICKSTART}\n{text}")
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  paramz: {}\n", "model.paramz: unknown key"),
        ("model:\n  class_name: AutoEncodr\n", "model.class_name: model_zoo.ae has no class 'AutoEncodr'"),
        ("model:\n  module_name: model_zoo.nothing_here\n", "model.module_name: no module named"),
        ("trainer:\n  params:\n    max_epochs: many\n", "trainer.params.max_epochs: expected an integer"),
        ("experiment:\n  tsk: train\n", "experiment.tsk: unknown key"),
        ("output_dir: /tmp/elsewhere\n", "<config>.output_dir: not a top-level key; it belongs in the experiment block "
         "(experiment: {output_dir: ...} in the YAML, --set experiment.output_dir=... on the command line)"),
        ("mode: online\n", "<config>.mode: not a top-level key; it belongs in the wandb block"),
        ("experiment:\n  device: tpu\n", "experiment.device: 'tpu' is not one of"),
        ("downstream_tasks:\n  thresholds:\n    params:\n      task: thresholdin\n", "downstream_tasks.thresholds"),
    ],
)
def test_bad_configs_name_the_path_and_exit_2(tmp_path, caplog, text, message):
    assert main(["--config_path", str(_write(tmp_path, text)), "--dry-run"]) == 2
    assert message in caplog.text


def test_a_stage1_network_is_refused_where_scores_are_needed(tmp_path, caplog):
    configs = REPO / "projects" / "normative_eval" / "configs"
    path = tmp_path / "wgan_evaluated.yaml"
    path.write_text(f"_base_: [{configs / 'fanogan_wgan_cpu.yaml'}, {configs / '_base' / 'evaluation.yaml'}]\n")
    assert main(["--config_path", str(path), "--dry-run"]) == 2
    assert "model.class_name: WGANGP is a stage-1 network: it trains but does not score anomalies" in caplog.text
    assert "FAnoGAN (fanogan*.yaml)" in caplog.text and str(path) in caplog.text
    assert "downstream_tasks must be empty for it (set downstream_tasks: null)" in caplog.text
    caplog.clear()
    weights = tmp_path / "latest.pt"
    weights.write_bytes(b"")
    stage1 = str(configs / "fanogan_wgan_cpu.yaml")
    assert main(["--config_path", stage1, "--dry-run", "--set", "experiment.task=evaluate",
                 "--set", f"experiment.weights={weights}"]) == 2
    assert "experiment.task 'evaluate' needs a model that scores anomalies" in caplog.text
    assert main(["--config_path", stage1, "--dry-run"]) == 0  # training it stays fine


def test_merge_conflict_exits_non_zero_from_the_command_line(tmp_path):
    path = _write(tmp_path, "<<<<<<< HEAD\nname: a\n=======\nname: b\n>>>>>>> other\n")
    done = subprocess.run([sys.executable, str(REPO / "core" / "Main.py"), "--config_path", str(path), "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert "merge-conflict marker" in done.stderr and "bad.yaml:2" in done.stderr


@pytest.mark.slow
def test_quickstart_reduced_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code = main([
        "--config_path", str(QUICKSTART), "--log_level", "WARNING",
        "--set", f"experiment.output_dir={tmp_path}", "--set", "wandb.mode=offline",
        "--set", "wandb.group=a_study", "--set", "wandb.job_type=quickstart",
        "--set", "trainer.params.max_steps=4", "--set", "trainer.params.max_epochs=1",
        # Inception features cost ~0.1 s per image on a CPU: keep the AHI small here (the main job runs it fully).
        "--set", "downstream_tasks.ahi.params.reference_limit=20",
        "--set", "downstream_tasks.ahi.params.datasets=[hypointense_lesion]",
        "--set", f"downstream_tasks.ahi.params.feature_cache={tmp_path / 'features'}", *SMOKE_DATA,
    ])
    assert code == 0
    (run_dir,) = [p for p in tmp_path.glob("*/*/*") if p.is_dir()]
    assert "Run folder:" in capsys.readouterr().out
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["trainer"]["params"]["max_steps"] == 4
    assert "trainer.params.max_steps=4" in resolved["overrides"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["seed"] == resolved.get("experiment", {}).get("seed", 42)
    assert manifest["packages"]["torch"].startswith("2.14.1")
    assert manifest["split_files"] and all(len(h) == 64 for h in manifest["split_files"].values())
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(k.startswith("train/") for k in metrics)
    for task in ("thresholds", "detection", "segmentation", "localization", "rqi", "ahi", "caci", "healthy_fpr",
                 "subject_detection", "subject_segmentation", "score_calibration", "p_values"):
        assert any(k.startswith(f"eval/{task}/") for k in metrics), f"no numbers from task {task}"
    assert (run_dir / "report.md").is_file() and (run_dir / "checkpoints" / "thresholds.json").is_file()
    assert (run_dir / "checkpoints" / "calibration.json").is_file()
    assert metrics["eval/p_values/healthy_test/image_fpr_n"] == SMOKE_COUNTS["n_test"]
    assert metrics["eval/score_calibration/val/n_images"] == SMOKE_COUNTS["n_val"]
    backends = manifest["backends"]  # the networks actually used, whatever 'auto' found on this machine
    assert backends.keys() >= {"rqi_caci_lpips", "fid_network"} and manifest["torch_threads"] >= 1
    header = (run_dir / "report.md").read_text().split("\n## ")[1]
    assert header.startswith("Backends and settings") and all(f"| {v} |" in header for v in backends.values())
    assert metrics["eval/cost/hypointense_lesion/s_per_image"] > 0 and "eval/cost/all_datasets/s_per_image" in metrics
    assert any((run_dir / "figures").glob("*.png"))
    run = read_run(find_run_file(run_dir))
    logged = {k for row in run["history"] for k in row}
    assert "train/loss" in logged
    assert run["summary"].keys() >= {k for k in metrics if k.startswith("eval/")}
    assert run["run"] == {"name": f"quickstart/{run_dir.name}", "group": "a_study", "job_type": "quickstart"}
    assert {"train", "healthy_test", "hypointense_lesion"} <= {p.stem for p in (run_dir / "per_image").glob("*.npz")}


# Wall-clock measurements: the only numbers of a run that may differ between two runs of the same command.
WALL_CLOCK_SUFFIXES = ("/s_per_image", "/time_s", "/wall_s")


@pytest.mark.slow
def test_quickstart_is_deterministic_at_a_fixed_thread_count(tmp_path, monkeypatch, one_thread):
    """Two reduced quickstart runs in one thread give the same metrics.json (every key; NaN stored as null)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    metrics = []
    for attempt in ("a", "b"):
        code = main([
            "--config_path", str(QUICKSTART), "--log_level", "WARNING",
            "--set", f"experiment.output_dir={tmp_path / attempt}", "--set", "wandb.mode=disabled",
            "--set", "trainer.params.max_steps=6", "--set", "trainer.params.max_epochs=1",
            "--set", "downstream_tasks.ahi.params.reference_limit=20",
            "--set", "downstream_tasks.ahi.params.datasets=[hypointense_lesion]",
            "--set", "downstream_tasks.ahi.params.feature_cache=",  # off: both runs compute every feature
            *SMOKE_DATA,
        ])
        assert code == 0
        (run_dir,) = [p for p in (tmp_path / attempt).glob("*/*/*") if p.is_dir()]
        metrics.append(json.loads((run_dir / "metrics.json").read_text()))
    first, second = metrics
    assert first.keys() == second.keys()
    timed = {k for k in first if k.endswith(WALL_CLOCK_SUFFIXES)}
    assert timed and all(k.startswith("eval/cost/") or k.endswith("/time_s") or k == "train/wall_s" for k in timed)
    assert any(k.startswith("eval/ahi/") for k in first) and any(k.startswith("train/") for k in first)
    differing = {k: (first[k], second[k]) for k in first.keys() - timed if first[k] != second[k]}
    assert differing == {}
