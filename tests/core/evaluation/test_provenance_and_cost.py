"""The AHI at equal n with its on-disk input-feature cache; every backend named; the inference cost per dataset."""

import json
import logging

import pytest
import torch

from core.evaluation import DownstreamEvaluator, EvalContext, build_downstream, evaluate, run_downstream
from core.evaluation import context as context_module
from dl_utils.run import Run
from optim.inception import InceptionFeatures
from optim.metrics import normative
from tests.core.evaluation.fakes import CountingModel, FakeData, RecordingLogger, TinyModel, block


class CountingInception:
    """The random Inception test network, recording every image set it is asked for."""

    def __init__(self, backend_name: str = "random") -> None:
        self.net = InceptionFeatures(backend="random")
        self.backend_name = backend_name
        self.provenance = {**self.net.provenance, "fid_backend": backend_name}
        self.calls: list[torch.Tensor] = []

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(images.clone())
        return self.net.features(images)


@pytest.fixture()
def inception(monkeypatch):
    net = CountingInception()
    monkeypatch.setattr(context_module, "make_inception", lambda backend, weights_path, device: net)
    return net


def _inputs(data: FakeData, name: str) -> torch.Tensor:
    return torch.cat([b.image for b in data.eval_dataloader(name)])


def _ahi(feature_cache):
    return {"ahi": DownstreamEvaluator(task="ahi", backend="random", min_class_size=5, feature_cache=feature_cache)}


# ------------------------------------------------------------------------------------------------ feature cache
def test_a_second_evaluation_reads_input_features_from_the_cache(tmp_path, inception, caplog):
    data = FakeData()
    cache = tmp_path / "features"
    with caplog.at_level(logging.INFO, logger="optim.feature_cache"):
        first = evaluate(TinyModel(), data, _ahi(str(cache)), seed=1)
    assert len(inception.calls) == 6  # N, U, two P, two R(P)
    assert sum("feature cache miss" in r.message for r in caplog.records) == 4  # N, U and the two P only
    inception.calls.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="optim.feature_cache"):
        second = evaluate(TinyModel(), data, _ahi(str(cache)), seed=1)
    assert sum("feature cache hit" in r.message for r in caplog.records) == 4
    # only the reconstructions went through the network again, never an input set (N, U, P)
    assert len(inception.calls) == 2
    inputs = [_inputs(data, name) for name in ("train", "healthy_test", "lesions", "boxes")]
    assert not any(torch.equal(call, x) for call in inception.calls for x in inputs if call.shape == x.shape)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    inception.calls.clear()
    evaluate(TinyModel(), data, _ahi(""), seed=1)  # switched off: every set is computed
    assert len(inception.calls) == 6


def test_the_cache_key_holds_the_backend(tmp_path, monkeypatch):
    data = FakeData()
    cache = tmp_path / "features"
    random_net = CountingInception("random")
    monkeypatch.setattr(context_module, "make_inception", lambda backend, weights_path, device: random_net)
    evaluate(TinyModel(), data, _ahi(str(cache)), seed=1)
    other = CountingInception("fid_helper")  # same images, another backend name: every input is a miss
    monkeypatch.setattr(context_module, "make_inception", lambda backend, weights_path, device: other)
    evaluate(TinyModel(), data, _ahi(str(cache)), seed=1)
    assert len(other.calls) == 6


def test_relative_cache_folders_are_under_the_repository_root():
    from core.evaluation.tasks.normative import REPO_ROOT, _cache_dir

    assert _cache_dir("cache/features") == REPO_ROOT / "cache" / "features"
    assert (REPO_ROOT / "core" / "evaluation" / "tasks" / "normative.py").is_file()
    assert _cache_dir(None) is None and _cache_dir("") is None


# ------------------------------------------------------------------------------------------------ equal n
def test_every_fid_of_a_row_is_taken_at_the_same_n(inception):
    data = FakeData()
    ctx = EvalContext(model=TinyModel(), data=data, device="cpu", seed=4, progress=False)
    result = _ahi(None)["ahi"](ctx).metrics
    # U has 6 images, the classes 6 and 5, pooled 11: each row's FIDs at min(n_U, n_P)
    assert result["lesions"]["n_fid"] == 6 and result["boxes"]["n_fid"] == 5
    assert result["all_pathological"]["n_fid"] == 6 and result["all_pathological"]["n_p"] == 11
    assert result["healthy_test"]["n_fid"] == result["healthy_test"]["n_u"] == 6
    feats = {name: ctx.features("random", None, name, "input")[0] for name in ("train", "healthy_test", "boxes")}
    recon = ctx.features("random", None, "boxes", "reconstruction")[0]
    expected = normative.ahi_equal_n(feats["train"], feats["healthy_test"], feats["boxes"], recon, draws=5, seed=4)
    assert result["boxes"] == pytest.approx(expected, nan_ok=True)
    assert result["boxes"]["fid_u"] != result["healthy_test"]["fid_u"]  # U subsampled to 5 in the class row


def test_draws_must_be_positive():
    with pytest.raises(ValueError, match=r"params\.draws: 0 is not in \(0, inf\)"):
        DownstreamEvaluator(task="ahi", draws=0)


# ------------------------------------------------------------------------------------------------ backends, cost
@pytest.fixture()
def reported(tmp_path):
    log = RecordingLogger()
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), seed=2, logger=log)
    tasks = {"thresholds": block("thresholding"), "detection": block("detection"),
             "rqi": block("rqi", backend="random"),
             "ahi": block("ahi", backend="random", min_class_size=5, feature_cache=None),
             "caci": block("caci", backend="random")}
    run_downstream(build_downstream(tasks), model=CountingModel().eval(), data=FakeData(), run=run, progress=False)
    return run, (tmp_path / "report.md").read_text()


def test_every_backend_is_in_the_manifest_the_config_and_the_report(reported):
    run, report = reported
    manifest = run.manifest()
    backends = manifest["backends"]
    assert backends["rqi_caci_lpips"].startswith("lpips/alex with a RANDOM backbone")
    assert backends["fid_network"] == "random (None)"
    assert backends["model_perceptual"] == CountingModel.PERCEPTUAL
    assert backends["model_inference"] == CountingModel.LABEL
    assert run.logger.config["backends"] == backends
    header = report.split("\n## ")[1]
    assert header.startswith("Backends and settings")
    for key, value in backends.items():
        assert f"| {key} | {value} |" in header
    # each affected block names its network and the model's settings beside its numbers
    assert manifest["eval/rqi"]["lpips_backend"] == backends["rqi_caci_lpips"]
    assert manifest["eval/caci"]["lpips_backend"] == backends["rqi_caci_lpips"]
    assert manifest["eval/ahi"]["fid_backend"] == "random"
    for block_name in ("detection", "rqi", "ahi", "caci"):
        assert manifest[f"eval/{block_name}"]["model"] == {"model_inference": CountingModel.LABEL,
                                                               "model_perceptual": CountingModel.PERCEPTUAL}


def test_inference_cost_per_dataset(reported):
    run, report = reported
    log = run.logger
    for name in ("val", "healthy_test", "lesions", "boxes", "all_datasets"):
        cost = log.evals[("cost", name)]
        assert cost["network_calls"] == 2.0 and cost["s_per_image"] > 0, name  # two calls of the net per batch
    assert "| lesions |" in report.split("Inference cost")[1].split("\n## ")[0]


def test_without_a_counted_network_only_seconds_are_reported(tmp_path):
    log = RecordingLogger()
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), logger=log)
    run_downstream(build_downstream({"detection": block("detection")}), model=TinyModel().eval(), data=FakeData(),
                   run=run, progress=False)
    assert set(log.evals[("cost", "lesions")]) == {"s_per_image"}
    assert run.manifest()["backends"] == {}
    assert "eval/detection" not in run.manifest()  # no provenance to record


# ------------------------------------------------------------------------------------------------ substitutes
class _FakePerceptual(torch.nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.backend_name = name


@pytest.mark.parametrize("backend,substitute,warned", [("auto", True, 1), ("stlpips", True, 0), ("auto", False, 0)])
def test_an_lpips_substitute_warns_once_per_process(monkeypatch, caplog, backend, substitute, warned):
    name = "stlpips/alex shift-tolerant (offline fallback)" if substitute else "lpips/alex (official weights)"
    monkeypatch.setattr(context_module, "_WARNED", set())
    monkeypatch.setattr(context_module, "make_perceptual", lambda b: _FakePerceptual(name))
    with caplog.at_level(logging.WARNING, logger="core.evaluation.context"):
        for _ in range(2):  # two evaluations in one process
            ctx = EvalContext(model=TinyModel(), data=FakeData(), device="cpu", progress=False)
            ctx.perceptual(backend)
            assert ctx.all_backends() == {"rqi_caci_lpips": name}
    assert sum("LPIPS" in r.message and name in r.message for r in caplog.records) == warned


def test_two_different_lpips_networks_are_both_named(monkeypatch):
    monkeypatch.setattr(context_module, "make_perceptual", lambda b: _FakePerceptual(f"net for {b}"))
    ctx = EvalContext(model=TinyModel(), data=FakeData(), device="cpu", progress=False)
    for backend in ("lpips", "stlpips", "lpips"):
        ctx.perceptual(backend)
    assert ctx.backends == {"rqi_caci_lpips": "net for lpips", "rqi_caci_lpips (stlpips)": "net for stlpips"}


def test_the_fid_helper_fallback_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(context_module, "_WARNED", set())
    net = CountingInception("fid_helper")
    monkeypatch.setattr(context_module, "make_inception", lambda backend, weights_path, device: net)
    with caplog.at_level(logging.WARNING, logger="core.evaluation.context"):
        for _ in range(2):
            EvalContext(model=TinyModel(), data=FakeData(), device="cpu", progress=False).inception("auto", None)
    assert sum("fid-helper" in r.message for r in caplog.records) == 1
