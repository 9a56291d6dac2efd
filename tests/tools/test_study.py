"""tools.study: parsing, skip/resume decisions, the comparison table and the README block."""

import json
import math
import subprocess
import time
from pathlib import Path

import pytest

from core.Configurator import ConfigError
from tools import study as st

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "projects" / "normative_eval" / "configs"
STUDIES = sorted((REPO / "projects").rglob("studies/*.yaml"))


def _study_yaml(tmp_path: Path, methods: str, extra: str = "") -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp_path / 'runs'}\n{extra}methods:\n{methods}")
    return path


def _fake_run(root: Path, method: str, stamp: str, *, status: str | None, metrics: dict | None = None,
              latest: bool = False) -> Path:
    run = root / "exp" / method / stamp
    (run / "checkpoints").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"status": status} if status else {}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    if latest:
        (run / "checkpoints" / "latest.pt").write_bytes(b"x")
    return run


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_parse(path):
    study = st.load_study(path)
    assert study.methods and all(m.config.is_file() for m in study.methods)


def test_method_names_follow_the_configs(tmp_path):
    study = st.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
                                                f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}, name: v2}}\n"))
    assert [m.name for m in study.methods] == ["ae_cpu", "v2"]
    assert study.folder == tmp_path / "runs" / "exp" / "_studies" / "s"


@pytest.mark.parametrize(("methods", "message"), [
    ("  - {config: nowhere.yaml}\n", "methods[0].config: file not found"),
    (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}, weights_from: later}}\n", "weights_from: 'later' is not a method"),
    (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n", "appear twice"),
    (f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}, overrides: [lr]}}\n", "overrides: expected a list of 'key.path"),
    (f"  - {{confg: {CONFIGS / 'ae_cpu.yaml'}}}\n", "confg"),
])
def test_bad_studies_name_the_entry(tmp_path, methods, message):
    with pytest.raises(ConfigError, match="s.yaml") as err:
        st.load_study(_study_yaml(tmp_path, methods))
    assert message in str(err.value)


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path, monkeypatch):
    study = st.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
                                                f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}}}\n"
                                                f"  - {{config: {CONFIGS / 'vae_cpu.yaml'}, name: again, "
                                                f"weights_from: ae_cpu}}\n",
                                      extra="overrides: [experiment.seed=3]\n"))
    done = _fake_run(study.output_dir, "ae_cpu", "20260101-000000", status="finished", metrics={})
    crashed = _fake_run(study.output_dir, "vae_cpu", "20260101-000001", status="interrupted", latest=True)
    calls = []

    def fake_run(command, **_):
        calls.append(command)
        name = next(c.split("=", 1)[1] for c in command if c.startswith("name="))
        target = crashed if name == "vae_cpu" else _fake_run(study.output_dir, name, "20260101-000002", status=None)
        (target / "manifest.json").write_text(json.dumps({"status": "finished"}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(st.subprocess, "run", fake_run)
    state: dict = {}
    assert st.run_method(study, study.methods[0], state) == done and not calls  # skipped, nothing run
    assert st.run_method(study, study.methods[1], state) == crashed
    assert f"experiment.resume={crashed}" in calls[0] and "experiment.seed=3" in calls[0]
    assert state["vae_cpu"]["resumed"] is True
    st.run_method(study, study.methods[2], state)
    assert "experiment.task=evaluate" in calls[1]
    assert f"experiment.weights={done / 'checkpoints' / 'best.pt'}" in calls[1]


def test_a_failed_method_is_reported_not_hidden(tmp_path, monkeypatch):
    study = st.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"))
    monkeypatch.setattr(st.subprocess, "run", lambda command, **_: subprocess.CompletedProcess(command, 1))
    assert st.run_method(study, study.methods[0], {}) is None


def _metrics(det: float, pix: float, rqi: float, caci: float) -> dict:
    return {"eval/detection/hypointense_lesion/auroc": det, "eval/segmentation/hypointense_lesion/auroc_pooled": pix,
            "eval/rqi/healthy_test/rqi": rqi, "eval/caci/all_annotated/caci": caci,
            "eval/caci/hypointense_lesion/caci": 0.0, "eval/detection/hypointense_lesion/auprc": 0.1}


def test_comparison_table_reads_the_right_keys_and_normalises(tmp_path):
    a = _fake_run(tmp_path, "a", "1", status="finished", metrics=_metrics(0.9, 0.8, 0.7, 0.6))
    b = _fake_run(tmp_path, "b", "1", status="finished", metrics=_metrics(0.5, 0.4, 0.3, 0.2))
    rows = st.comparison_rows([st.read_row("a", a, 12.0), st.read_row("b", b, None)])
    assert rows[0]["hypointense_lesion image AUROC"] == 0.9 and rows[1]["hypointense_lesion pixel AUROC"] == 0.4
    assert rows[0]["CACI"] == 0.6  # the pooled all_annotated key, not the per-class one
    assert rows[0]["RQI (norm)"] == 1.0 and rows[1]["RQI (norm)"] == 0.0
    assert rows[0]["wall s"] == 12.0


NAN = float("nan")
CLASSES = ("mass_effect", "all_pathological", "hypointense_lesion")  # all_pathological not first in the flat row


def _flat_table() -> list[dict]:
    """Two methods with a distinct number in every cell; all_pathological pixel AUROC and AHI empty for both."""
    rows = []
    for k, method in enumerate(("ae", "vae")):
        row: dict = {"method": method}
        for j, c in enumerate(CLASSES):
            row[f"{c} image AUROC"] = 0.101 + 0.01 * j + 0.5 * k
            row[f"{c} pixel AUROC"] = NAN if c == "all_pathological" else 0.201 + 0.01 * j + 0.5 * k
        row.update({"RQI": 0.301 + k, "AHI": NAN, "CACI": 0.311 + k, "RQI (norm)": 0.321 + k, "AHI (norm)": NAN,
                    "CACI (norm)": 0.331 + k, "combined": NAN, "wall s": 0.341 + k,
                    "train s": NAN if method == "vae" else 0.351,  # partly empty (evaluation-only vae): kept
                    "network calls / image": 0.361 + k, "test s / image": 0.371 + k})
        rows.append(row)
    return rows


def _parse(text: str) -> dict[str, list[list[str]]]:
    """Bold title -> table lines split into cells (header first, the |---| line left out)."""
    tables: dict[str, list[list[str]]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("**") and line.endswith("**"):
            title = line.strip("*")
            tables[title] = []
        elif line.startswith("| ") and title is not None:
            tables[title].append([cell.strip() for cell in line.strip("|").split("|")])
    return tables


def test_markdown_splits_the_comparison_into_three_tables():
    text = st.markdown(_flat_table())
    tables = _parse(text)
    assert list(tables) == ["Detection (image AUROC)", "Segmentation (pixel AUROC, pooled over the evaluation region)",
                            "Normative learning and cost"]
    detection, segmentation, normative = tables.values()
    assert detection[0] == ["method", "all pathological", "mass effect", "hypointense lesion"]
    assert detection[1:] == [["ae", "0.111", "0.101", "0.121"], ["vae", "0.611", "0.601", "0.621"]]
    assert segmentation[0] == ["method", "mass effect", "hypointense lesion"]  # the empty all_pathological column out
    assert segmentation[1:] == [["ae", "0.201", "0.221"], ["vae", "0.701", "0.721"]]
    assert normative[0] == ["method", "RQI", "CACI", "RQI (norm)", "CACI (norm)", "wall s", "train s",
                            "network calls / image", "test s / image"]  # AHI, AHI (norm), combined out
    assert normative[1:] == [["ae", "0.301", "0.311", "0.321", "0.331", "0.341", "0.351", "0.361", "0.371"],
                             ["vae", "1.301", "1.311", "1.321", "1.331", "1.341", "–", "1.361", "1.371"]]
    note = text.split("Normative learning and cost")[1]
    for column in ("all_pathological pixel AUROC", "AHI", "AHI (norm)", "combined"):
        assert f"`{column}`" in note
    assert "`train s`" not in note


def test_every_number_of_the_flat_row_lands_in_exactly_one_table():
    table = _flat_table()
    cells = [cell for rows in _parse(st.markdown(table)).values() for row in rows[1:] for cell in row[1:]]
    numbers = [f"{v:.3f}" for row in table for k, v in row.items() if k != "method" and not math.isnan(v)]
    assert sorted(cells) == sorted([*numbers, "–"])  # the one "–" is vae's train s


def test_sections_skip_a_table_with_no_values_and_keep_a_single_method():
    table = [{k: v for k, v in _flat_table()[0].items() if "pixel" not in k}]
    assert [s.title for s in st.sections(table)] == ["Detection (image AUROC)", "Normative learning and cost"]
    assert st.empty_columns(table) == ["AHI", "AHI (norm)", "combined"]
    assert st.markdown([]) == "(no finished runs)\n"


def test_write_comparison_keeps_the_flat_csv_and_writes_the_tables(tmp_path):
    a = _fake_run(tmp_path, "a", "1", status="finished", metrics=_metrics(0.9, 0.8, 0.7, 0.6))
    b = _fake_run(tmp_path, "b", "1", status="finished", metrics=_metrics(0.5, 0.4, 0.3, 0.2))
    rows = [st.read_row("a", a, 12.0), st.read_row("b", b, None)]
    study = st.Study(name="s", experiment="exp", output_dir=tmp_path / "runs", overrides=(), methods=(),
                     source=tmp_path / "s.yaml")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- study:s:begin -->\n<!-- study:s:end -->\n")
    paths = st.write_comparison(study, rows, readme=readme)
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert header == list(st.comparison_rows(rows)[0])
    assert "AHI" in header and "train s" in header  # empty for every method, still in the CSV
    md = paths["markdown"].read_text()
    assert "command: `python -m tools.study" in md and "**Detection (image AUROC)**" in md
    assert "| method | hypointense lesion |" in md and "`AHI`" in md
    assert st.markdown(st.comparison_rows(rows)).strip() in readme.read_text()
    figures = {"image AUROC": "image_auroc.png", "pixel AUROC": "pixel_auroc.png", "indices": "indices.png",
               "cost vs detection": "cost_vs_detection.png"}
    for kind, name in figures.items():
        assert paths[kind] == study.folder / "figures" / name
        assert paths[kind].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[kind].stat().st_size > 1000


def test_figures_show_the_non_empty_columns_of_their_tables(tmp_path, monkeypatch):
    from dl_utils import visualization

    drawn: dict = {}

    def spy(name):
        real = getattr(visualization, name)

        def record(values, **kwargs):
            drawn.setdefault(name, []).append(values)
            return real(values, **kwargs)
        return record

    monkeypatch.setattr(visualization, "heatmap", spy("heatmap"))
    monkeypatch.setattr(visualization, "cost_vs_quality", spy("cost_vs_quality"))
    table = _flat_table()
    table[1]["wall s"] = NAN
    paths = st.write_figures(tmp_path, table)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    image, pixel, indices = drawn["heatmap"]
    assert list(image) == ["ae", "vae"]
    assert image["vae"] == {"all pathological": 0.611, "mass effect": 0.601, "hypointense lesion": 0.621}
    assert pixel["ae"] == {"mass effect": 0.201, "hypointense lesion": 0.221}  # all-NaN all_pathological out
    assert indices["vae"] == {"RQI": 1.301, "CACI": 1.311, "RQI (norm)": 1.321, "CACI (norm)": 1.331}  # no cost
    (points,) = drawn["cost_vs_quality"]
    assert points["ae"] == (0.341, 0.111) and math.isnan(points["vae"][0]) and points["vae"][1] == 0.611


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- study:s:begin -->\nold table\n<!-- study:s:end -->\noutro\n")
    st.update_readme(readme, "s", "| new |\n")
    assert readme.read_text() == "intro\n<!-- study:s:begin -->\n| new |\n<!-- study:s:end -->\noutro\n"
    with pytest.raises(ConfigError, match="markers"):
        st.update_readme(readme, "other", "x")


def test_a_second_stage_gets_its_first_stage_checkpoint_and_wall_time(tmp_path, monkeypatch):
    study = st.load_study(_study_yaml(
        tmp_path, f"  - {{config: {CONFIGS / 'vqvae_cpu.yaml'}, name: s1}}\n"
                  f"  - {{config: {CONFIGS / 'ltm_cpu.yaml'}, name: s2, "
                  "stage1: {from: s1, set: model.params.vqvae_checkpoint, checkpoint: best.pt}}\n"))
    calls = []

    def fake_run(command, **_):
        calls.append(command)
        name = next(c.split("=", 1)[1] for c in command if c.startswith("name="))
        metrics = {} if name == "s1" else _metrics(0.9, 0.8, 0.7, 0.6)  # stage 1: no downstream evaluation
        _fake_run(study.output_dir, name, "20260101-000000", status="finished", metrics=metrics)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(st.subprocess, "run", fake_run)
    state: dict = {}
    s1 = st.run_method(study, study.methods[0], state)
    st.run_method(study, study.methods[1], state)
    assert f"model.params.vqvae_checkpoint={s1 / 'checkpoints' / 'best.pt'}" in calls[1]
    state["s1"]["wall_s"], state["s2"]["wall_s"] = 100.0, 20.0
    rows = st.comparison_inputs(study, state)
    assert [r.method for r in rows] == ["s2"] and rows[0].cost["wall_s"] == 120.0


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
        st.load_study(_study_yaml(tmp_path, methods))
    assert message in str(err.value)


def test_the_load_average_is_sampled_during_a_run_and_reaches_the_table(tmp_path, monkeypatch):
    study = st.load_study(_study_yaml(tmp_path, f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"))
    loads = iter([1.0, 3.0] + [3.0] * 100)
    monkeypatch.setattr(st.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))

    def fake_run(command, **_):
        time.sleep(0.35)  # long enough for the sampler (interval 0.1 s below) to take several samples
        _fake_run(study.output_dir, "ae_cpu", "20260101-000000", status="finished",
                  metrics=_metrics(0.9, 0.8, 0.7, 0.6))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(st.subprocess, "run", fake_run)
    original = st.LoadSampler.__init__
    monkeypatch.setattr(st.LoadSampler, "__init__", lambda self, interval=0.1: original(self, interval))
    state: dict = {}
    st.run_method(study, study.methods[0], state)
    assert 1.0 < state["ae_cpu"]["load_average"] <= 3.0  # the mean of the samples: 1.0, then 3.0s
    rows = st.comparison_rows(st.comparison_inputs(study, state))
    assert rows[0]["load avg"] == state["ae_cpu"]["load_average"]
    assert st.total_wall(study, state) == state["ae_cpu"]["wall_s"]


@pytest.mark.parametrize(("value", "text"), [(0.7213, "0.721"), (23.599, "24"), (441.2, "441"), (30.0, "30"),
                                             (0.00033, "0.00033"), (0.0, "0.000"), (1.0, "1.000"), (9.0, "9"),
                                             (float("nan"), "–")])
def test_numbers_are_formatted_for_reading(value, text):
    assert st._fmt(value) == text
