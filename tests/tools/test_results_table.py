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
    assert lines[0] == ("| class | image AUROC | pixel AUROC | Dice @ 5 % healthy FPR | oracle Dice (upper bound) | "
                        "detected | CACI |")
    assert lines[2] == "| zeta lesion | 0.646 | 0.618 | 0.103 | 0.181 | 28 / 60 | 0.480 |"
    assert lines[3] == "| alpha lesion | 0.841 | 0.816 | 0.438 | 0.444 | 60 / 60 | nan |"
    assert "RQI 0.704 on `healthy_test` (SSIM 0.871, LPIPS 0.192)" in block
    assert "AHI nan over all pathological sets (FID(P,N) 27.1, FID(R(P),N) 213, FID(U,N) 30.2, each at n = 60" in block
    assert "CACI 0.559 over all annotated images" in block
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


def test_a_folder_without_metrics_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.json: not found" in capsys.readouterr().err
