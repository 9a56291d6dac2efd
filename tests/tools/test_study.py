"""tools.study: the study YAML, the runner's skip/resume/seed decisions, per-image checks, cells and tables."""

import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from core.Configurator import ConfigError
from tests.tools import _study_fakes as fakes
from tools.study import evidence, plan, report, results, runner
from tools.study.evidence import Cell

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "projects" / "normative_eval" / "configs"
STUDIES = sorted((REPO / "projects").rglob("studies/*.yaml"))


def _study_yaml(tmp_path: Path, methods: str, extra: str = "") -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp_path / 'runs'}\n{extra}methods:\n{methods}")
    return path


def _fake_run(root: Path, method: str, stamp: str, *, status: str | None, metrics: dict | None = None,
              latest: bool = False, seed: int | None = None, overrides: list[str] | None = None) -> Path:
    """A run folder as Main leaves it; ``overrides``: its config.yaml's (default: the seed's, as a study sets it)."""
    run = root / "exp" / method / stamp
    (run / "checkpoints").mkdir(parents=True)
    if overrides is None:
        overrides = [] if seed is None else [f"experiment.seed={seed}"]
    (run / "config.yaml").write_text(json.dumps({"overrides": overrides}))
    manifest = {"status": status} if status else {}
    if seed is not None:
        manifest["seed"] = seed
    (run / "manifest.json").write_text(json.dumps(manifest))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if latest:
        (run / "checkpoints" / "latest.pt").write_bytes(b"x")
    return run


def _value(command: list[str], key: str) -> str:
    return next(c.split("=", 1)[1] for c in command if c.startswith(f"{key}="))


def _sets(command: list[str]) -> list[str]:
    """The --set values of a command line (what Main records as the config's ``overrides``)."""
    return [command[i + 1] for i, c in enumerate(command) if c == "--set"]


# ------------------------------------------------------------------------------------------------ the YAML
@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_parse(path):
    study = plan.load_study(path)
    assert study.methods and all(m.config.is_file() for m in study.methods)
    assert study.reference is not None and study.reference.is_file()


def test_method_names_follow_the_configs(tmp_path):
    study = plan.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
                                                  f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}, name: v2}}\n"))
    assert [m.name for m in study.methods] == ["ae_cpu", "v2"]
    assert study.folder == tmp_path / "runs" / "exp" / "_studies" / "s"
    assert study.seeds == (None,) and study.statistics == plan.Statistics()
    assert study.reference == REPO / "docs" / "reference_results.csv"


@pytest.mark.parametrize(("methods", "message"), [
    ("  - {config: nowhere.yaml}\n", "methods[0].config: file not found"),
    (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}, weights_from: later}}\n", "weights_from: 'later' is not a method"),
    (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n", "appear twice"),
    (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}, overrides: [lr]}}\n", "overrides: expected a list of 'key.path"),
    (f"  - {{confg: {CONFIGS / 'ae_cpu.yaml'}}}\n", "confg"),
])
def test_bad_studies_name_the_entry(tmp_path, methods, message):
    with pytest.raises(ConfigError, match="s.yaml") as err:
        plan.load_study(_study_yaml(tmp_path, methods))
    assert message in str(err.value)


@pytest.mark.parametrize(("extra", "message"), [
    ("seeds: 3\n", "seeds: expected a non-empty list of integers"),
    ("seeds: [1, 1]\n", "lists a seed twice"),
    ("seeds: [true]\n", "expected a non-empty list of integers"),
    ("seeds: [1]\noverrides: [experiment.seed=4]\n", "both set the seed"),
    ("statistics: {replicate: 10}\n", "statistics.replicate: unknown key (did you mean 'replicates'?)"),
    ("statistics: {replicates: 30}\n", "use at least 40 replicates"),  # 2 / 31 >= 0.05: p < alpha unreachable
    ("statistics: {level: 95}\n", "level: 95 must be in (0, 1)"),
    ("reference: missing.csv\n", "reference: file not found"),
])
def test_seeds_statistics_and_reference_are_checked(tmp_path, extra, message):
    with pytest.raises(ConfigError) as err:
        plan.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n", extra))
    assert message in str(err.value) and "s.yaml" in str(err.value)


def test_jobs_run_seed_by_seed_and_the_reference_can_be_switched_off(tmp_path):
    study = plan.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ddpm_cpu.yaml'}}}\n"
                                                  f"  - {{config: {CONFIGS / 'autoddpm_cpu.yaml'}, "
                                                  "weights_from: ddpm_cpu}\n",
                                        "seeds: [3, 1]\nreference: null\nstatistics: {replicates: 40}\n"))
    assert [j.key for j in study.jobs()] == ["ddpm_cpu/seed3", "autoddpm_cpu/seed3", "ddpm_cpu/seed1",
                                             "autoddpm_cpu/seed1"]
    assert study.methods[1].needs == ("ddpm_cpu",) and study.reference is None
    assert study.statistics.replicates == 40


# ------------------------------------------------------------------------------------------------ the runner
def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path):
    study = plan.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
                                                  f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}}}\n"
                                                  f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}, name: again, "
                                                  f"weights_from: ae_cpu}}\n",
                                        extra="overrides: [trainer.params.max_epochs=1]\nseeds: [3, 4]\n"))
    shortened = ["trainer.params.max_epochs=1"]
    done = _fake_run(study.output_dir, "ae_cpu", "20260101-000000", status="finished", metrics={}, seed=3,
                     overrides=[*shortened, "experiment.seed=3", "name=ae_cpu", "wandb.group=another_study"])
    _fake_run(study.output_dir, "ae_cpu", "20260101-000009", status="finished", metrics={}, seed=3,
              overrides=["experiment.seed=3"])  # newer, but made without the study's override: not this job's
    crashed = _fake_run(study.output_dir, "vae_cpu", "20260101-000001", status="interrupted", latest=True, seed=3,
                        overrides=[*shortened, "experiment.seed=3"])
    _fake_run(study.output_dir, "vae_cpu", "20260101-000002", status="interrupted", latest=True, seed=4,
              overrides=[*shortened, "experiment.seed=4"])
    calls = []

    def launch(command, log_path):
        calls.append(command)
        name, seed = _value(command, "name"), int(_value(command, "experiment.seed"))
        resume = next((c.split("=", 1)[1] for c in command if c.startswith("experiment.resume=")), None)
        target = Path(resume) if resume else _fake_run(study.output_dir, name, f"2026010{seed}-10000{len(calls)}",
                                                       status=None, seed=seed, overrides=_sets(command))
        (target / "manifest.json").write_text(json.dumps({"status": "finished", "seed": seed}))
        return 0

    state: dict = {}
    jobs = {j.key: j for j in study.jobs()}
    assert runner.run_job(study, jobs["ae_cpu/seed3"], state, launch=launch) == done and not calls  # skipped
    assert runner.run_job(study, jobs["vae_cpu/seed3"], state, launch=launch) == crashed
    assert f"experiment.resume={crashed}" in calls[0] and "trainer.params.max_epochs=1" in calls[0]
    assert _value(calls[0], "experiment.seed") == "3" and state["vae_cpu/seed3"]["resumed"] is True
    runner.run_job(study, jobs["again/seed3"], state, launch=launch)
    assert "experiment.task=evaluate" in calls[1]
    assert f"experiment.weights={done / 'checkpoints' / 'best.pt'}" in calls[1]
    # seed 4: ae_cpu's seed-3 run does not count; again/seed4 waits for ae_cpu/seed4's weights
    assert runner.run_job(study, jobs["again/seed4"], state, launch=launch) is None and len(calls) == 2
    ae4 = runner.run_job(study, jobs["ae_cpu/seed4"], state, launch=launch)
    assert ae4 != done and "experiment.resume" not in " ".join(calls[2])
    runner.run_job(study, jobs["again/seed4"], state, launch=launch)
    assert f"experiment.weights={ae4 / 'checkpoints' / 'best.pt'}" in calls[3]


def test_a_failed_method_is_reported_not_hidden(tmp_path):
    study = plan.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"))
    state: dict = {}
    assert runner.run_jobs(study, study.jobs(), state, launch=lambda command, log: 1) == ["ae_cpu"]
    assert state == {} and json.loads((study.folder / "runs.json").read_text()) == {}


def test_the_local_launcher_writes_the_log(tmp_path):
    log = tmp_path / "x.log"
    assert runner.launch_local(["python", "-c", "print('hello')"], log) == 0
    assert runner.launch_local(["python", "-c", "raise SystemExit(3)"], log) == 3
    assert log.read_text().startswith("hello")


def test_a_second_stage_gets_its_first_stage_checkpoint_and_wall_time(tmp_path):
    study = plan.load_study(_study_yaml(
        tmp_path, f"  - {{config: {CONFIGS / 'vqvae_cpu.yaml'}, name: s1}}\n"
                  f"  - {{config: {CONFIGS / 'ltm_cpu.yaml'}, name: s2, "
                  "stage1: {from: s1, set: model.params.vqvae_checkpoint, checkpoint: best.pt}}\n"))
    calls = []

    def launch(command, log_path):
        calls.append(command)
        name = _value(command, "name")
        metrics = {} if name == "s1" else {"eval/detection/x/auroc": 0.9}  # stage 1: no downstream evaluation
        _fake_run(study.output_dir, name, "20260101-000000", status="finished", metrics=metrics,
                  overrides=_sets(command))
        return 0

    state: dict = {}
    s1 = runner.run_job(study, study.jobs()[0], state, launch=launch)
    runner.run_job(study, study.jobs()[1], state, launch=launch)
    assert f"model.params.vqvae_checkpoint={s1 / 'checkpoints' / 'best.pt'}" in calls[1]
    assert _value(calls[1], "wandb.group") == "s" and _value(calls[1], "wandb.job_type") == "s2"
    state["s1"]["wall_s"], state["s2"]["wall_s"] = 100.0, 20.0
    found = results.collect(study, state)
    assert [r.method for r in found] == ["s2"] and found[0].wall_s == 120.0
    assert results.total_wall(study, state) == 120.0


@pytest.mark.parametrize(("stage1", "message"), [
    ("{from: later, set: model.params.x}", "stage1.from: 'later' is not a method"),
    ("{from: ae_cpu, set: trainer.params.x}", "must be a model.params.* key"),
    ("{from: ae_cpu, set: model.params.x, checkpoint: last.pt}", "must be 'latest.pt' or 'best.pt'"),
    ("{from: ae_cpu}", "set"),
])
def test_bad_stage1_entries_name_the_key(tmp_path, stage1, message):
    methods = (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
               f"  - {{config: {CONFIGS / 'ltm_cpu.yaml'}, stage1: {stage1}}}\n")
    with pytest.raises(ConfigError, match="methods\\[1\\]") as err:
        plan.load_study(_study_yaml(tmp_path, methods))
    assert message in str(err.value)


def test_the_load_average_is_sampled_during_a_run_and_reaches_the_table(tmp_path, monkeypatch):
    study = plan.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"))
    loads = iter([1.0, 3.0] + [3.0] * 100)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))

    def launch(command, log_path):
        time.sleep(0.35)  # long enough for the sampler (interval 0.1 s below) to take several samples
        _fake_run(study.output_dir, "ae_cpu", "20260101-000000", status="finished", metrics={"eval/x/y/z": 1.0},
                  overrides=_sets(command))
        return 0

    original = runner.LoadSampler.__init__
    monkeypatch.setattr(runner.LoadSampler, "__init__", lambda self, interval=0.1: original(self, interval))
    state: dict = {}
    runner.run_job(study, study.jobs()[0], state, launch=launch)
    assert 1.0 < state["ae_cpu"]["load_average"] <= 3.0  # the mean of the samples: 1.0, then 3.0s
    (found,) = results.collect(study, state)
    assert found.points()["load avg"] == state["ae_cpu"]["load_average"]


# ------------------------------------------------------------------------------------------------ per-image checks
def _result(tmp_path: Path, kind: str, name: str, seed: int = 1) -> results.RunResult:
    run = fakes.write_run(tmp_path / name / str(seed), kind, seed)
    from core.evaluation.per_image import read_per_image

    method = plan.Method(name=name, config=CONFIGS / "ae_cpu.yaml")
    return results.RunResult(job=plan.Job(method=method, seed=seed), run=run,
                             metrics=json.loads((run / "metrics.json").read_text()),
                             tables=read_per_image(run / "per_image"))


def test_runs_on_different_images_are_refused(tmp_path):
    a, b = _result(tmp_path, "good", "a"), _result(tmp_path, "flat", "b")
    table = b.tables["lesion"]
    b.tables["lesion"] = type(table)(path=("l/0.png", "l/2.png", "l/1.png"), label=table.label,
                                     columns=table.columns, constants=table.constants)
    with pytest.raises(results.StudyDataError, match="dataset 'lesion': b/seed1 .* other images than a/seed1") as err:
        results.replicates([a, b], count=40, seed=0)
    assert "image 1 is 'l/2.png'" in str(err.value)


def test_per_image_numbers_that_contradict_the_run_are_refused(tmp_path):
    a = _result(tmp_path, "good", "a")
    a.metrics["eval/rqi/healthy_test/rqi"] = 0.5  # the tables give 0.8
    with pytest.raises(results.StudyDataError, match="RQI recomputed from per_image/ is 0.8.*reports 0.5"):
        results.replicates([a], count=40, seed=0)


def test_the_sets_resampled_leave_out_the_ahi_reference(tmp_path):
    units = results.resampled_sets([_result(tmp_path, "good", "a")])
    assert {name: len(u.members) for name, u in units.items()} == {"healthy_test": 3, "lesion": 3}


def test_subjects_are_resampled_whole(tmp_path):
    """Two slices of subject v and one of w: a resample draws subjects, each with all its slices."""
    from core.evaluation.per_image import PerImage

    table = PerImage.of(["a", "b", "c"], [0, 0, 0], {"rqi/rqi": [0.2, 0.4, 0.9]}, subject=["v", "w", "v"])
    units = results.Units.of(table)
    assert [m.tolist() for m in units.members] == [[0, 2], [1]]
    draws = results.Draws({"h": units}, {"h": np.array([[0, 0], [1, 1], [1, 0]])})
    np.testing.assert_array_equal(draws.weights("h", 3), [[2, 0, 2], [0, 2, 0], [1, 1, 1]])
    assert draws.images("h", 3, 2).tolist() == [1, 0, 2]
    means = results.column_values({"h": table}, draws, results.FeatureCache())["RQI"]
    np.testing.assert_allclose(means, [(0.2 + 0.9) / 2, 0.4, (0.2 + 0.4 + 0.9) / 3])
    identity = results.Draws.identity({"h": table})
    assert identity.images("h", 3, 0).tolist() == [0, 1, 2]  # the original order, not grouped by subject


def test_a_run_without_per_image_tables_gets_no_interval(tmp_path, caplog):
    a = _result(tmp_path, "good", "a")
    a.tables = {}
    boot = results.replicates([a], count=40, seed=0)
    assert boot == {"a/seed1": {}} and "no per_image/ tables" in caplog.text
    found = evidence.build([a], boot, order=["a"], seeds=[1], statistics=plan.Statistics(replicates=40))
    cell = found.cells["a"]["RQI"]
    assert cell.value == pytest.approx(0.8) and math.isnan(cell.low) and math.isnan(cell.high)


# ------------------------------------------------------------------------------------------------ cells and tables
def _points_only(name: str, seed: int, rqi: float) -> results.RunResult:
    method = plan.Method(name=name, config=CONFIGS / "ae_cpu.yaml")
    return results.RunResult(job=plan.Job(method=method, seed=seed), run=Path(name),
                             metrics={"eval/rqi/healthy_test/rqi": rqi, "eval/detection/x/auroc": 0.6})


def test_a_method_identical_to_the_best_on_every_resample_is_not_distinguishable_from_it():
    runs = [_points_only("a", 1, 0.7), _points_only("b", 1, 0.7), _points_only("c", 1, 0.1)]
    same = np.linspace(0.6, 0.8, 40)
    boot = {"a/seed1": {"RQI": same}, "b/seed1": {"RQI": same.copy()}, "c/seed1": {"RQI": same - 0.6}}
    found = evidence.build(runs, boot, order=["a", "b", "c"], seeds=[1], statistics=plan.Statistics(replicates=40))
    cells = {m: found.cells[m]["RQI"] for m in "abc"}
    assert cells["a"].mark == "best" and cells["b"].mark == "tied" and cells["c"].mark == ""  # a first in order
    assert cells["b"].p_value == 1.0 and cells["c"].p_value == pytest.approx(2 / 41)
    comparison = next(c for c in found.comparisons if c.column == "RQI" and c.method == "c")
    assert comparison.distinguishable is True and comparison.low == comparison.high == pytest.approx(0.6)
    undefined = next(c for c in found.comparisons if c.column == "x image AUROC" and c.method == "b")
    assert undefined.distinguishable is None  # no replicates of that column: no verdict, no mark
    assert found.cells["b"]["x image AUROC"].mark == ""


@pytest.mark.parametrize(("cell", "text"), [
    (Cell(value=0.7213, low=0.68, high=0.76), "0.721 [0.68, 0.76]"),
    (Cell(value=0.7213, spread=0.012, low=0.68, high=0.76, mark="best"), "**0.721** ± 0.012 [0.68, 0.76]"),
    (Cell(value=0.7, low=0.6, high=0.8, mark="tied"), "0.700 [0.60, 0.80] ≈"),
    (Cell(value=0.7), "0.700"),
    (Cell(value=float("nan")), "–"),
])
def test_cells_are_written_for_reading(cell, text):
    assert report.cell_text(cell) == text


@pytest.mark.parametrize(("value", "text"), [(0.7213, "0.721"), (23.599, "24"), (441.2, "441"), (30.0, "30"),
                                             (0.00033, "0.00033"), (0.0, "0.000"), (1.0, "1.000"), (9.0, "9"),
                                             (float("nan"), "–")])
def test_numbers_are_formatted_for_reading(value, text):
    assert report.fmt(value) == text


def test_tables_leave_out_empty_columns_and_name_them():
    runs = [_points_only("a", 1, 0.7), _points_only("b", 1, 0.3)]
    found = evidence.build(runs, {}, order=["a", "b"], seeds=[1], statistics=plan.Statistics())
    text = report.comparison_markdown(found)
    assert "**Detection (image AUROC)**" in text and "| method | x |" in text
    assert "| method | RQI |" in text and "Segmentation" not in text  # no pixel AUROC column has a value
    assert "`AHI`, `CACI`, `combined`" in text and "`wall s`" in text
    assert "one run per method (no spread across seeds)" in text
    assert report.comparison_markdown(evidence.build([], {}, order=[], seeds=[1], statistics=plan.Statistics())) \
        == "(no finished runs)\n"


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study:s:begin -->\nold table\n<!-- study:s:end -->\noutro\n")
    report.update_readme(readme, "s", "| new |\n")
    assert readme.read_text() == "intro\n<!-- study:s:begin -->\n| new |\n<!-- study:s:end -->\noutro\n"
    with pytest.raises(ConfigError, match="markers"):
        report.update_readme(readme, "other", "x")


def test_a_failing_launch_leaves_the_study_exit_code_one(tmp_path, monkeypatch):
    from tools.study import __main__ as cli

    path = _study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n", "reference: null\n")
    monkeypatch.setattr(runner, "launch_local", lambda command, log: subprocess.CompletedProcess(command, 1).returncode)
    assert cli.main([str(path), "--no-wandb"]) == 1
    assert (tmp_path / "runs" / "exp" / "_studies" / "s" / "study.md").read_text().count("(no finished runs)") == 1
    assert cli.main([str(path), "--only", "nope"]) == 2


# ------------------------------------------------------------------------------------------------ the reference
PUBLISHED_COMBINED = {"AutoDDPM": 0.545, "PHANES": 0.536, "RA": 0.245, "pDDPM": 0.243, "DDPM-S": 0.242,
                      "DDPM-G": 0.214, "MorphAEus": 0.195, "SI-VAE": 0.147, "f-AnoGAN": 0.120, "LTM": 0.103,
                      "ceVAE": 0.087, "AE-S": 0.056, "VAE": 0.034, "MAE": 0.018}  # the reference study's ranking


def test_the_reference_file_reproduces_the_published_combined_ranking_and_names_real_configs():
    from tools.study import analysis

    reference = analysis.read_reference(plan.DEFAULT_REFERENCE)
    combined = {m: v["combined"] for m, v in reference.values.items()}
    assert combined == pytest.approx(PUBLISHED_COMBINED, abs=5e-4)
    assert sorted(combined, key=combined.get, reverse=True) == list(PUBLISHED_COMBINED)
    assert len(reference.configs) == 2 * len(PUBLISHED_COMBINED)
    for config in reference.configs:
        assert (CONFIGS / f"{config}.yaml").is_file(), config
        assert plan.read_yaml_name(CONFIGS / f"{config}.yaml") == config  # the run name the study matches on


@pytest.mark.parametrize(("text", "message"), [
    ("method,rqi,ahi,caci,source\n", "missing columns ['configs']"),
    ("method,configs,rqi,ahi,caci,source\nA,a,0.5,x,0.1,s\n", "reference.csv:2: could not convert"),
    ("method,configs,rqi,ahi,caci,source\nA,a,0.5,0,0.1,s\nB,b;a,0.5,0,0.1,s\n", "reference.csv:3: config 'a' is"),
])
def test_a_bad_reference_file_names_the_line(tmp_path, text, message):
    from tools.study import analysis

    path = tmp_path / "reference.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match="reference.csv") as err:
        analysis.read_reference(path)
    assert message in str(err.value)


def test_figures_show_the_mean_values_and_the_correlations_on_a_symmetric_scale(monkeypatch):
    from dl_utils import visualization

    drawn: list = []
    real = visualization.heatmap

    def spy(values, **kwargs):
        drawn.append((values, kwargs))
        return real(values, **kwargs)

    monkeypatch.setattr(visualization, "heatmap", spy)
    runs = [_points_only("a", 1, 0.7), _points_only("a", 2, 0.5), _points_only("b", 1, 0.3)]
    found = evidence.build(runs, {}, order=["a", "b"], seeds=[1, 2], statistics=plan.Statistics())
    from optim.stats import CorrelationTest
    from tools.study.analysis import CorrelationRow

    test = CorrelationTest(method="spearman", estimate=-0.5, low=-1.0, high=0.5, p_value=0.5, n=2, n_replicates=9,
                           exact=True)
    rho = [CorrelationRow(index="RQI", target="x image AUROC", test=test)]
    figures = report.figures(found, rho)
    assert set(figures) == {"image AUROC", "pixel AUROC", "indices", "cost vs detection",
                            "correlation heatmap"}
    image, pixel, indices, correlations = drawn
    assert image[0] == {"a": {"x": 0.6}, "b": {"x": 0.6}} and pixel[0] == {"a": {}, "b": {}}
    assert indices[0]["a"] == {"RQI": pytest.approx(0.6)}  # the mean over a's two seeds
    assert correlations[0] == {"RQI": {"x (image)": -0.5}}
    assert (correlations[1]["vmin"], correlations[1]["vmax"]) == (-1.0, 1.0)
