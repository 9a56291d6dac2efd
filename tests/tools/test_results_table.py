"""tools.results_table: the README's quickstart block regenerated from a run folder."""

import json

import pytest
import yaml

from tools.results_table import BEGIN, END, main, replace_block, results_block


def _run(folder):
    folder.mkdir()
    metrics = {"train/loss": 0.1}
    for name, auroc, pix, dice, oracle, det, caci in (("zeta_lesion", 0.6461, 0.618, 0.1034, 0.181, 28, 0.4801),
                                                      ("alpha_lesion", 0.841, 0.8164, 0.438, 0.444, 60, None)):
        metrics |= {f"eval/detection/{name}/auroc": auroc, f"eval/segmentation/{name}/auroc_pooled": pix,
                    f"eval/segmentation/{name}/dice_pooled": dice,
                    f"eval/segmentation/{name}/oracle_best_dice_pooled": oracle,
                    f"eval/localization/{name}/n_detected": det, f"eval/localization/{name}/n_total": 60.0,
                    f"eval/caci/{name}/caci": caci}
    metrics |= {"eval/detection/healthy_test/auroc": 0.5, "eval/rqi/healthy_test/rqi": 0.7042,
                "eval/rqi/healthy_test/ssim_mean": 0.871, "eval/rqi/healthy_test/lpips_mean": 0.192,
                "eval/ahi/all_pathological/ahi": None, "eval/ahi/all_pathological/fid_p": 27.13,
                "eval/ahi/all_pathological/fid_rp": 213.4, "eval/ahi/all_pathological/fid_u": 30.2,
                "eval/ahi/all_pathological/n_fid": 60.0, "eval/ahi/all_pathological/draws": 5.0,
                "eval/caci/all_annotated/caci": 0.559}
    metrics |= {"eval/segmentation/zeta_lesion/aupro": 0.3232, "eval/segmentation/zeta_lesion/tpr_pooled": 0.0848,
                "eval/segmentation/alpha_lesion/aupro": 0.6423, "eval/segmentation/alpha_lesion/tpr_pooled": 0.4686}
    h = "eval/healthy_fpr/healthy_test"
    metrics |= {f"{h}/n_subjects": 20.0, f"{h}/n_slices": 60.0}
    for tag, median, q25, q75, any_fp in (("fpr5pct", 0.0516, 0.0413, 0.0625, 1.0), ("fpr1pct", 0.0087, 0.0064,
                                                                                      0.0135, 0.95)):
        metrics |= {f"{h}/{tag}_median": median, f"{h}/{tag}_q25": q25, f"{h}/{tag}_q75": q75,
                    f"{h}/{tag}_any_fp": any_fp}
    p = "eval/p_values/healthy_test"
    metrics |= {"eval/score_calibration/val/n_images": 60.0, "eval/score_calibration/val/n_subjects": 20.0,
                f"{p}/image_fpr_n": 60.0, f"{p}/subject_fpr_n": 20.0}
    for level, alpha, fpr, low, high, a_low, a_high, valid in (
            ("image", 5, 0.0167, 0.0004, 0.0894, 0.0, 0.15, 1.0), ("image", 10, 0.25, 0.147, 0.379, 0.017, 0.217, 0.0),
            ("subject", 5, 0.05, 0.0013, 0.249, 0.0, 0.25, 1.0), ("subject", 10, 0.1, 0.012, 0.317, 0.0, 0.3, 1.0)):
        key = f"{p}/{level}_fpr_alpha{alpha}pct"
        metrics |= {key: fpr, f"{key}_low": low, f"{key}_high": high, f"{key}_accept_low": a_low,
                    f"{key}_accept_high": a_high, f"{p}/{level}_valid_alpha{alpha}pct": valid}
    metrics |= {"eval/p_values/zeta_lesion/image_power_n": 60.0,
                "eval/p_values/zeta_lesion/image_power_alpha5pct": 0.13}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {"data": {"params": {"test": {"healthy_test": {}, "zeta_lesion": {}, "alpha_lesion": {}}}},
              "downstream_tasks": {"segmentation": {"params": {"fpr": 0.05}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = {"git": {"commit": "0123456789abcdef", "dirty": False}, "torch_threads": 1,
                "command": ["core/Main.py", "--config_path", "q.yaml"],
                "backends": {"rqi_caci_lpips": "stlpips/alex", "fid_network": "fid_helper (/x.pt)"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_block_rows_follow_the_config_order_and_the_metrics(tmp_path):
    block = results_block(_run(tmp_path / "20260101-000000"))
    lines = block.splitlines()
    assert lines[0] == ("| class | image AUROC | pixel AUROC | AUPRO | Dice @ 5 % healthy FPR | pixel TPR @ 5 % "
                        "healthy FPR | oracle Dice (upper bound) | detected | CACI |")
    assert lines[2] == "| zeta lesion | 0.646 | 0.618 | 0.323 | 0.103 | 0.085 | 0.181 | 28 / 60 | 0.480 |"
    assert lines[3] == "| alpha lesion | 0.841 | 0.816 | 0.642 | 0.438 | 0.469 | 0.444 | 60 / 60 | nan |"
    assert "RQI 0.704 on `healthy_test` (SSIM 0.871, LPIPS 0.192)" in block
    assert "AHI nan over all pathological sets (FID(P,N) 27.1, FID(R(P),N) 213, FID(U,N) 30.2, each at n = 60" in block
    assert "CACI 0.559 over all annotated images" in block
    # Thresholds in increasing order, whatever the key order of metrics.json.
    assert ("per healthy test subject (`healthy_test`, n = 20 subjects, 3 slices each): at the 1 % threshold median "
            "0.009 (IQR 0.006-0.013), 95 % of subjects with a false-positive pixel; at the 5 % threshold median 0.052 "
            "(IQR 0.041-0.062), 100 % of subjects") in block
    assert ("Calibrated p-values against `val` (n = 60 images, 20 subjects): empirical false-positive rate on "
            "`healthy_test` per image (n = 60) at alpha 0.05: 0.017 (95 % interval 0.000-0.089; a valid calibration "
            "gives 0.000-0.150: valid); at alpha 0.1: 0.250 (95 % interval 0.147-0.379; a valid calibration gives "
            "0.017-0.217: NOT valid); per subject (n = 20) at alpha 0.05: 0.050") in block
    assert "Power per image at alpha 0.05: zeta lesion 0.13." in block
    for fact in ("run `20260101-000000`", "commit `0123456789ab`", "command `python core/Main.py --config_path q.yaml`",
                 "torch threads 1", "rqi_caci_lpips stlpips/alex", "fid_network fid_helper (/x.pt)"):
        assert fact in block


def test_readme_block_is_replaced_between_the_markers_only(tmp_path):
    run = _run(tmp_path / "run")
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\ntext before\n{BEGIN}\n| old | table |\n{END}\ntext after\n")
    assert main([str(run), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"# Title\n\ntext before\n{BEGIN}\n| class |") and text.endswith(f"{END}\ntext after\n")
    assert "| old | table |" not in text and "| zeta lesion |" in text
    assert main([str(run), "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent


@pytest.mark.parametrize("text", ["no markers\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n"])
def test_bad_markers_are_an_error_and_leave_the_file_untouched(tmp_path, capsys, text):
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert main([str(_run(tmp_path / "run")), "--readme", str(readme)]) == 2
    assert readme.read_text() == text and "results:quickstart:begin" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one"):
        replace_block(text, "x")


def test_blocks_the_run_did_not_have_are_left_out(tmp_path):
    run = _run(tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    kept = {k: v for k, v in metrics.items() if not k.startswith(("eval/healthy_fpr", "eval/p_values"))}
    (run / "metrics.json").write_text(json.dumps(kept))
    block = results_block(run)
    assert "healthy test subject" not in block and "Calibrated p-values" not in block


def test_a_folder_without_metrics_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.json: not found" in capsys.readouterr().err
