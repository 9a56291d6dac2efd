"""Acceptance: a two-method, two-seed study end to end (plan, runner with a fake launcher, per-image tables,
bootstrap, paired comparison, correlations, agreement, outputs, wandb summary), checked against hand-computed
values on the fixed design of tests/tools/_study_fakes.py.

By design (3 healthy and 3 lesion images, B = 40 resamples, the fewest for which p < 0.05 is possible):
- "good" (run as ae_cpu) has image and pixel AUROC 1 and AHI 1 in every resample, CACI 0.5, RQI 0.8 / 0.6 on
  seeds 1 / 2 (constant within a seed); "flat" (run as vae_cpu) has AUROC 0.5 and AHI 0 in every resample,
  CACI 0.1, RQI terms 0.2, 0.4, 0.6 on both seeds.
- Paired: ae_cpu - vae_cpu is 0.5 in every resample of each AUROC column, so its interval is [0.5, 0.5] and
  p = 2 (1 + 0) / (B + 1) = 2 / 41 < 0.05.
- Correlations across two methods: rho = 1 for every (index, number) pair (ae_cpu is higher in all), the
  permutation p is exact, both orderings reach |rho| = 1: p = 1; resamples that draw two different methods give
  rho = 1, the others are constant and left out: interval [1, 1].
- Agreement with the reference (AE-S RQI .88 > VAE .04, CACI .06 < .22, AHI .00 = .00, combined .056 > .034):
  tau = 1, -1, undefined (tied reference), 1.
"""

import csv
import importlib.util
import json
import math

import numpy as np
import pytest

from optim.stats import bootstrap_indices
from tests.tools import _study_fakes as fakes
from tests.wandb_reader import find_run_file, read_run
from tools.study import __main__ as cli
from tools.study import runner

REPO = fakes.Path(__file__).resolve().parents[2]
CONFIGS = REPO / "projects" / "normative_eval" / "configs"
B = 40
KINDS = {"ae_cpu": "good", "vae_cpu": "flat"}


def _study(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp_path / 'runs'}\nseeds: [1, 2]\n"
                    f"statistics: {{replicates: {B}, seed: 0}}\n"
                    f"methods:\n  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
                    f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}}}\n")
    return path


def _value(command, key):
    return next(c.split("=", 1)[1] for c in command if c.startswith(f"{key}="))


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("study")
    commands = []

    def launch(command, log_path):
        commands.append(list(command))
        name, seed = _value(command, "name"), int(_value(command, "experiment.seed"))
        sets = [command[i + 1] for i, c in enumerate(command) if c == "--set"]
        fakes.write_run(tmp_path / "runs" / "exp" / name / f"2026010{seed}-000000", KINDS[name], seed, sets)
        return 0

    monkey = pytest.MonkeyPatch()
    monkey.setattr(runner, "launch_local", launch)
    monkey.delenv("WANDB_MODE", raising=False)
    try:
        code = cli.main([str(_study(tmp_path))])
    finally:
        monkey.undo()
    folder = tmp_path / "runs" / "exp" / "_studies" / "s"
    return code, folder, commands, tmp_path


def _csv(path):
    return list(csv.DictReader(path.open()))


def test_every_method_runs_once_per_seed_in_the_studys_wandb_group(study_run):
    code, folder, commands, _ = study_run
    assert code == 0
    jobs = [(_value(c, "name"), _value(c, "experiment.seed")) for c in commands]
    assert jobs == [("ae_cpu", "1"), ("vae_cpu", "1"), ("ae_cpu", "2"), ("vae_cpu", "2")]
    for c in commands:
        assert _value(c, "wandb.group") == "s" and _value(c, "wandb.job_type") == _value(c, "name")
    assert set(json.loads((folder / "runs.json").read_text())) == {"ae_cpu/seed1", "vae_cpu/seed1", "ae_cpu/seed2",
                                                                   "vae_cpu/seed2"}


def _ahi_defined(drawn: dict[str, np.ndarray]) -> np.ndarray:
    """[B] whether a resample drew at least two distinct images of every AHI set (FID needs two)."""
    return np.all([[len(np.unique(row)) >= 2 for row in drawn[name]] for name in ("healthy_test", "lesion")], axis=0)


def test_interval_and_seed_columns_are_the_hand_computed_ones(study_run):
    _, folder, _, _ = study_run
    rows = {r["method"]: r for r in _csv(folder / "study.csv")}
    good, flat = rows["ae_cpu"], rows["vae_cpu"]
    assert good["seeds"] == flat["seeds"] == "2"
    for column in ("lesion image AUROC", "all_pathological image AUROC", "lesion pixel AUROC", "AHI"):
        expected = {"ae_cpu": 1.0, "vae_cpu": 0.5 if column != "AHI" else 0.0}
        for method, row in rows.items():
            assert [float(row[f"{column}{s}"]) for s in ("", " low", " high", " seed sd")] == \
                pytest.approx([expected[method]] * 3 + [0.0]), (method, column)
    assert float(good["RQI"]) == pytest.approx(0.7) and float(good["RQI seed sd"]) == pytest.approx(math.sqrt(0.02))
    assert float(good["RQI low"]) == float(good["RQI high"]) == pytest.approx(0.7)  # constant within each seed
    # flat's RQI varies with the resample: the interval of the mean of the drawn images' terms, drawn here directly
    drawn = bootstrap_indices({"healthy_test": 3, "lesion": 3}, replicates=B, seed=0)
    draws = drawn["healthy_test"]
    means = np.array([0.2, 0.4, 0.6])[draws].mean(axis=1)
    assert [float(flat["RQI low"]), float(flat["RQI high"])] == pytest.approx(np.quantile(means, [0.025, 0.975]))
    assert float(flat["RQI"]) == pytest.approx(0.4) and float(flat["RQI seed sd"]) == 0.0
    combined = {s: ((2 * r * 0.5 / (r + 0.5)) + 1.0) / 2 for s, r in ((1, 0.8), (2, 0.6))}
    assert float(good["combined"]) == pytest.approx((combined[1] + combined[2]) / 2)
    assert float(good["combined low"]) == pytest.approx((combined[1] + combined[2]) / 2)
    assert float(good["combined seed sd"]) == pytest.approx(abs(combined[1] - combined[2]) / math.sqrt(2))
    flat_combined = ((2 * means * 0.1 / (means + 0.1)) + 0.0) / 2
    # AHI's resamples use each draw's distinct images; one with a single distinct image in a set has no AHI
    defined = _ahi_defined(drawn)
    assert [float(flat["combined low"]), float(flat["combined high"])] == \
        pytest.approx(np.quantile(flat_combined[defined], [0.025, 0.975]))


def test_the_paired_comparison_against_the_best(study_run):
    _, folder, _, _ = study_run
    comparisons = {r["column"]: r for r in _csv(folder / "comparisons.csv")}
    for column in ("lesion image AUROC", "lesion pixel AUROC"):
        row = comparisons[column]
        assert (row["best"], row["method"]) == ("ae_cpu", "vae_cpu")
        assert [float(row[k]) for k in ("difference", "low", "high")] == pytest.approx([0.5, 0.5, 0.5])
        assert float(row["p_value"]) == pytest.approx(2 / (B + 1)) and row["distinguishable"] == "true"
    defined = _ahi_defined(bootstrap_indices({"healthy_test": 3, "lesion": 3}, replicates=B, seed=0))
    assert 0 < defined.sum() < B  # the 3-image fakes make some resamples AHI-less
    assert float(comparisons["AHI"]["p_value"]) == pytest.approx(2 / (defined.sum() + 1))
    rows = {r["method"]: r for r in _csv(folder / "study.csv")}
    assert rows["ae_cpu"]["lesion image AUROC mark"] == "best" and rows["vae_cpu"]["lesion image AUROC mark"] == ""
    md = (folder / "study.md").read_text()
    assert "| ae_cpu | **1.000** ± 0.000 [1.00, 1.00] |" in md  # the detection table: all_pathological first
    assert "| vae_cpu | 0.500 ± 0.000 [0.50, 0.50] | 0.500 ± 0.000 [0.50, 0.50] |" in md


def test_the_correlation_table(study_run):
    _, folder, _, _ = study_run
    rows = _csv(folder / "correlations.csv")
    assert len(rows) == 5 * 3  # RQI, AHI, CACI, combined, AHI (unclipped) x (2 image + 1 pixel AUROC columns)
    assert {r["index"] for r in rows} == {"RQI", "AHI", "CACI", "combined", "AHI (unclipped)"}
    for r in rows:
        assert [float(r[k]) for k in ("rho", "low", "high", "p_value")] == [1.0, 1.0, 1.0, 1.0], r
        assert r["n_methods"] == "2" and r["exact_permutations"] == "True" and 0 < int(r["n_replicates"]) < B
    assert (folder / "figures" / "correlations.png").read_bytes()[:4] == b"\x89PNG"


def test_the_agreement_with_the_reference(study_run):
    _, folder, _, _ = study_run
    rows = {r["index"]: r for r in _csv(folder / "agreement.csv")}
    assert float(rows["RQI"]["kendall_tau"]) == 1.0 and float(rows["CACI"]["kendall_tau"]) == -1.0
    assert float(rows["combined"]["kendall_tau"]) == 1.0
    assert (float(rows["CACI"]["low"]), float(rows["CACI"]["high"])) == (-1.0, -1.0)
    assert math.isnan(float(rows["AHI"]["kendall_tau"]))  # AE-S and VAE tie at AHI 0.00 in the reference
    assert rows["RQI"]["methods"] == "ae_cpu=AE-S;vae_cpu=VAE" and rows["RQI"]["p_value"] == "1.0"
    md = (folder / "study.md").read_text()
    assert "not a pass mark" in md and "fastMRI+" in md


def test_the_summary_run_holds_the_tables_and_the_agreement(study_run):
    _, folder, _, _ = study_run
    run_file = find_run_file(folder / "summary")
    run = read_run(run_file)
    assert run["run"] == {"name": "s/summary", "group": "s", "job_type": "study"}
    values = {k: v for row in run["history"] for k, v in row.items()}
    for table in ("comparison", "comparisons", "correlations", "agreement"):
        assert values[f"study/tables/{table}/_type"] == "table-file", table
    for figure in ("image_AUROC", "pixel_AUROC", "indices", "cost_vs_detection", "correlation_heatmap"):
        assert values[f"study/figures/{figure}/_type"] == "image-file", figure
    assert values["agreement/RQI/kendall_tau"] == 1.0 and values["agreement/CACI/kendall_tau"] == -1.0
    (table,) = run_file.parent.glob("files/media/table/study/tables/agreement_*.table.json")
    logged = json.loads(table.read_text())
    rqi = dict(zip(logged["columns"], next(r for r in logged["data"] if r[0] == "RQI"), strict=True))
    assert rqi["kendall_tau"] == 1.0 and rqi["methods"] == "ae_cpu=AE-S;vae_cpu=VAE"
    manifest = json.loads((folder / "summary" / "manifest.json").read_text())  # a Run like every run
    assert (manifest["task"], manifest["status"]) == ("study", "finished") and "git" in manifest
    assert manifest["wandb"]["id"] and (folder / "summary" / "config.yaml").is_file()


def test_the_command_lists_every_output_once(study_run, capsys, monkeypatch):
    _, folder, _, tmp_path = study_run
    monkeypatch.setattr(runner, "launch_local", lambda *_: pytest.fail("--report-only launched a run"))
    assert cli.main([str(tmp_path / "s.yaml"), "--report-only", "--no-wandb"]) == 0
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert listed["correlations"].endswith("correlations.csv")
    assert listed["correlation heatmap"].endswith("figures/correlations.png")
    assert all(fakes.Path(p).is_file() for p in listed.values())


def test_a_report_only_rerun_reproduces_every_number(study_run, monkeypatch):
    _, folder, _, tmp_path = study_run
    before = {name: (folder / name).read_text() for name in ("study.csv", "comparisons.csv", "correlations.csv",
                                                             "agreement.csv")}
    monkeypatch.setattr(runner, "launch_local", lambda *_: pytest.fail("--report-only launched a run"))
    assert cli.main([str(tmp_path / "s.yaml"), "--report-only", "--no-wandb"]) == 0
    for name, text in before.items():
        assert (folder / name).read_text() == text, name


def test_python_dash_m_tools_study_finds_the_command_line():
    spec = importlib.util.find_spec("tools.study.__main__")
    assert spec is not None and spec.origin.endswith("tools/study/__main__.py")
