"""A full evaluation of every task on the fake data, shared by the evaluation tests (run once per module)."""

import pytest
import torch

from core.evaluation import build_downstream, run_downstream
from dl_utils.run import Run
from tests.core.evaluation.fakes import FakeData, RecordingLogger, TinyModel, block

ALL_TASKS = {
    "detection": block("detection"),
    "segmentation": block("segmentation", fpr=0.05),
    "localization": block("localization", fpr=0.05),
    "rqi": block("rqi", backend="random"),
    "ahi": block("ahi", backend="random", min_class_size=5, feature_cache=None),
    "caci": block("caci", backend="random"),
    "thresholds": block("thresholding", fprs=[0.01, 0.05]),  # last in YAML, still runs first
    "off": {**block("detection"), "enabled": False},
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    data, model, log = FakeData(), TinyModel().eval(), RecordingLogger()
    run = Run(run_dir=tmp_path_factory.mktemp("run"), device=torch.device("cpu"), seed=3, logger=log)
    results = run_downstream(build_downstream(ALL_TASKS, data=data), model=model, data=data, run=run, progress=False)
    return results, run, data, model, log
