"""The intermediates task: AutoDDPM's x_rec, c, mask, stitched start and x_inp in figures and, if asked, on disk."""

import numpy as np
import torch

from core.evaluation import build_downstream, run_downstream
from dl_utils.run import Run
from tests.core.evaluation.fakes import FakeData, RecordingLogger, TinyModel, block
from tests.model_zoo.test_autoddpm import tiny_autoddpm


def _run(tmp_path, model, **params):
    tmp_path.mkdir(parents=True, exist_ok=True)  # a run folder exists before its evaluation
    data, log = FakeData(), RecordingLogger()
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), seed=5, logger=log)
    tasks = {"inter": block("intermediates", datasets=["lesions"], n_examples=2, **params)}
    results = run_downstream(build_downstream(tasks, data=data), model=model, data=data, run=run, progress=False)
    return results, data, log


def test_autoddpm_intermediates_are_figured_and_saved_as_computed(tmp_path):
    model = tiny_autoddpm(tau=0.2)
    results, data, log = _run(tmp_path, model, save_intermediates=True)
    assert "eval/inter/lesions/intermediates" in log.figures
    saved = np.load(tmp_path / "intermediates" / "lesions.npz")
    assert {"image", "anomaly_map", "reconstruction", "x_rec", "c", "mask", "stitched", "x_inp", "path"} <= set(saved)
    # The arrays are the model's own outputs for these images under the evaluation's seeding (not recomputed).
    generator = torch.Generator().manual_seed(5)
    first = next(iter(data.eval_dataloader("lesions")))
    out = model.get_anomaly(first.image, generator=generator)
    n = first.image.shape[0]
    for key in ("x_rec", "c", "mask", "stitched", "x_inp"):
        np.testing.assert_array_equal(saved[key][:n], out.extras[key].numpy())
    np.testing.assert_array_equal(saved["anomaly_map"][:n], out.anomaly_map.numpy())
    assert list(saved["path"][:n]) == list(first.path)
    fraction = float(saved["mask"].reshape(len(saved["mask"]), -1).mean(1).mean())
    assert results["inter"]["lesions"]["mask_fraction_mean"] == fraction and 0 < fraction < 1


def test_nothing_written_unless_asked_and_models_without_extras_are_noted(tmp_path):
    _run(tmp_path / "a", tiny_autoddpm(tau=0.2))
    assert not (tmp_path / "a" / "intermediates").exists()
    results, _, log = _run(tmp_path / "b", TinyModel().eval(), save_intermediates=True)
    assert results["inter"] == {} and not log.figures
    assert not (tmp_path / "b" / "intermediates").exists()
