"""Task registry: task names, option names, types, ranges and dataset names checked when a block is built."""

import pytest

from core.Configurator import ConfigError
from core.evaluation import TASKS, build_downstream
from core.evaluation.thresholds import MaskCalibration, Thresholds
from tests.core.evaluation.conftest import ALL_TASKS
from tests.core.evaluation.fakes import FakeData, block


def test_build_skips_disabled_and_validates_task_and_options():
    built = build_downstream(ALL_TASKS)
    assert "off" not in built and built["thresholds"].task == "thresholding"
    assert build_downstream(None) == {}
    with pytest.raises(ConfigError, match=r"downstream_tasks\.x.*'detektion'.*valid tasks: ahi, caci"):
        build_downstream({"x": block("detektion")})
    with pytest.raises(ConfigError, match=r"downstream_tasks\.seg.*params\.fp_rate.*valid options: datasets"):
        build_downstream({"seg": block("segmentation", fp_rate=0.05)})
    with pytest.raises(ConfigError, match=r"params\.region.*'brian' is not one of"):
        build_downstream({"seg": block("segmentation", region="brian")})
    with pytest.raises(ConfigError, match=r"params\.fprs.*expected a list"):
        build_downstream({"t": block("thresholding", fprs=0.05)})
    assert set(TASKS) >= {"thresholding", "detection", "segmentation", "localization", "rqi", "ahi", "caci"}


@pytest.mark.parametrize(("params", "message"), [
    ({"task": "thresholding", "fprs": [0.01, 5]}, r"params\.fprs: 5 is not in \(0, 1\)"),
    ({"task": "thresholding", "fprs": [0.0]}, r"params\.fprs: 0\.0 is not in \(0, 1\)"),
    ({"task": "segmentation", "fpr": 1}, r"params\.fpr: 1 is not in \(0, 1\)"),
    ({"task": "localization", "fpr": "0.05"}, r"params\.fpr: expected a number"),
    ({"task": "detection", "datasets": "lesions"}, r"params\.datasets: expected .*Sequence\[str\].*got str"),
])
def test_option_types_and_ranges_are_checked_without_data(params, message):
    with pytest.raises(ConfigError, match=message):
        build_downstream({"b": block(**params)})


def test_artifacts_are_declared_by_signature_and_are_not_yaml_options():
    assert TASKS["segmentation"].requires == {"thresholds": Thresholds}
    assert TASKS["localization"].requires == {"thresholds": Thresholds}
    assert TASKS["thresholding"].provides == (Thresholds,)
    assert TASKS["thresholding"].requires == {"calibration": MaskCalibration}
    assert TASKS["mask_calibration"].provides == (MaskCalibration,) and not TASKS["mask_calibration"].requires
    assert TASKS["detection"].requires == {} and TASKS["detection"].provides == ()
    with pytest.raises(ConfigError, match=r"params\.thresholds: unknown option"):
        build_downstream({"seg": block("segmentation", thresholds={"0.05": 0.3})})


@pytest.mark.parametrize(("name", "params", "message"), [
    ("detection", {"task": "detection", "healthy": "healthy_tst"},
     r"downstream_tasks\.detection\.params\.healthy: 'healthy_tst' is not a dataset.*valid names: train, val, "
     r"healthy_test, lesions, boxes"),
    ("seg", {"task": "segmentation", "datasets": ["lesions", "atlas"]}, r"downstream_tasks\.seg\.params\.datasets: "
     r"'atlas'"),
    ("thr", {"task": "thresholding", "dataset": "validation"}, r"downstream_tasks\.thr\.params\.dataset: 'validation'"),
    ("ahi", {"task": "ahi", "reference": "training"}, r"downstream_tasks\.ahi\.params\.reference: 'training'"),
])
def test_dataset_names_are_checked_against_the_data_module(name, params, message):
    with pytest.raises(ConfigError, match=message):
        build_downstream({name: block(**params)}, data=FakeData())
    build_downstream({name: block(**params)})  # without a data module only the types are checked


def test_default_dataset_names_are_checked_too():
    class NoHealthyTest(FakeData):
        @property
        def test_set_names(self):
            return ["lesions"]

    with pytest.raises(ConfigError, match=r"downstream_tasks\.rqi\.params\.dataset: 'healthy_test'"):
        build_downstream({"rqi": block("rqi")}, data=NoHealthyTest())
    built = build_downstream({"rqi": block("rqi", dataset="val")}, data=NoHealthyTest())
    assert built["rqi"].options == {"dataset": "val"}
