"""``--dry-run`` catches bad evaluation options (dataset names, FPRs, unknown options, types) with exit code 2."""

import pytest

from core.Main import main
from tests.core.test_main import QUICKSTART


@pytest.mark.parametrize(("override", "message"), [
    ("downstream_tasks.detection.params.healthy=healthy_tst",
     "downstream_tasks.detection.params.healthy: 'healthy_tst' is not a dataset of the data module; valid names: "
     "train, val, healthy_test"),
    ("downstream_tasks.thresholds.params.fprs=[0.01,5]", "params.fprs: 5 is not in (0, 1)"),
    ("downstream_tasks.segmentation.params.datasets=[hypointense_lesion,atlas]",
     "downstream_tasks.segmentation.params.datasets: 'atlas' is not a dataset"),
    ("downstream_tasks.localization.params.fpr=0", "params.fpr: 0 is not in (0, 1)"),
    ("downstream_tasks.segmentation.params.fp_rate=0.05", "params.fp_rate: unknown option for task 'segmentation'"),
    ("downstream_tasks.rqi.params.n_examples=four", "params.n_examples: expected an integer"),
])
def test_bad_task_options_fail_the_dry_run(caplog, override, message):
    assert main(["--config_path", str(QUICKSTART), "--dry-run", "--set", override]) == 2
    assert message in caplog.text and "config error" in caplog.text


def test_a_valid_dataset_override_passes(capsys):
    code = main(["--config_path", str(QUICKSTART), "--dry-run", "--log_level", "WARNING",
                 "--set", "downstream_tasks.detection.params.datasets=[hypointense_lesion]"])
    assert code == 0 and "dry run OK" in capsys.readouterr().out
