"""The cross-run report CLI on two fake run folders."""

import csv
import json
import math

import pytest
import yaml

from tools.report import compare, main, minmax, read_run


def _run(folder, name, rqi, ahi, caci, f1):
    folder.mkdir(parents=True)
    metrics = {
        "eval/rqi/healthy_test/rqi": rqi, "eval/rqi/healthy_test/ssim_mean": 0.9,
        "eval/ahi/lesions/ahi": 0.0, "eval/ahi/all_pathological/ahi": ahi,
        "eval/caci/lesions/caci": caci, "eval/caci/all_annotated/caci": caci,
        "eval/localization/edema/f1_mean": f1, "eval/localization/edema/n_detected": 3,
        "eval/localization/edema/n_total": 4, "eval/localization/mass/f1_mean": None,
        "eval/localization/mass/n_detected": 0, "eval/localization/mass/n_total": 2,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.yaml").write_text(yaml.safe_dump({"name": name, "model": {"class_name": "X"}}))
    return folder


def test_read_run_picks_pooled_values(tmp_path):
    run = read_run(_run(tmp_path / "a", "autoddpm", 0.9, 0.49, 0.45, 0.5))
    assert run.name == "autoddpm"
    assert run.values == {"rqi": 0.9, "ahi": 0.49, "caci": 0.45}
    assert run.sources["ahi"] == "eval/ahi/all_pathological/ahi"
    assert run.localization["edema"] == {"f1_mean": 0.5, "n_detected": 3.0, "n_total": 4.0}
    assert math.isnan(run.localization["mass"]["f1_mean"])


def test_compare_combined_and_minmax(tmp_path):
    a = read_run(_run(tmp_path / "a", "autoddpm", 0.9, 0.49, 0.45, 0.5))
    b = read_run(_run(tmp_path / "b", "ae", 0.88, 0.0, 0.06, 0.1))
    raw = compare([a, b])
    # ((hm(0.9, 0.45) = 0.6) + 0.49) / 2
    assert raw[0]["combined"] == pytest.approx((0.6 + 0.49) / 2)
    norm = compare([a, b], normalize=True)
    assert norm[0]["rqi_normalized"] == 1.0 and norm[1]["rqi_normalized"] == 0.0
    assert norm[0]["combined"] == pytest.approx(1.0) and norm[1]["combined"] == pytest.approx(0.0)
    assert all(math.isnan(v) for v in minmax([0.3, 0.3]))


def test_cli_writes_markdown_csv_and_figure(tmp_path, capsys):
    a = _run(tmp_path / "runs" / "a", "autoddpm", 0.9, 0.49, 0.45, 0.5)
    b = _run(tmp_path / "runs" / "b", "ae", 0.88, 0.0, 0.06, 0.1)
    out = tmp_path / "out"
    assert main([str(a), str(b), "--out", str(out), "--normalize"]) == 0
    md = (out / "comparison.md").read_text()
    assert "| autoddpm |" in md and "rqi_normalized" in md and "3 of 4" in md and "0 of 2" in md
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["model"] for r in rows] == ["autoddpm", "ae"]
    assert float(rows[0]["combined"]) == pytest.approx(1.0)
    assert (out / "localization.csv").read_text().startswith("class,")
    assert (out / "indices.png").stat().st_size > 1000
    assert "markdown:" in capsys.readouterr().out


def test_cli_without_any_finished_run_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "nope"), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'nope'}: not a folder" in err
    assert f"skipping {tmp_path / 'empty'}: no metrics.json" in err
    assert "none of the 2 folder(s) is a finished run" in err


def test_cli_skips_unfinished_runs_and_reports_the_rest(tmp_path, capsys):
    done = _run(tmp_path / "done", "ae", 0.9, 0.5, 0.4, 0.5)
    (done / "manifest.json").write_text(json.dumps({"status": "finished"}))
    crashed = _run(tmp_path / "crashed", "vae", 0.1, 0.1, 0.1, 0.1)
    (crashed / "manifest.json").write_text(json.dumps({"status": "failed", "error": "DataError: x.png"}))
    out = tmp_path / "out"
    assert main([str(done), str(crashed), "--out", str(out)]) == 0
    assert f"skipping {crashed}: the run did not finish (status 'failed': DataError: x.png)" in capsys.readouterr().err
    table = (out / "comparison.md").read_text()
    assert "| ae |" in table and "vae" not in table
