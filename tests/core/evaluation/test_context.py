"""The evaluation context: inference once per dataset, seeded; FID reference images without augmentation."""

import torch

from core.evaluation import EvalContext
from dl_utils.run import Run
from tests.core.evaluation.fakes import FakeData, TinyModel


def test_fid_reference_set_comes_from_the_unaugmented_loader(tmp_path):
    data = FakeData()
    ctx = EvalContext.from_run(model=TinyModel().eval(), data=data, run=Run(run_dir=tmp_path, device="cpu"),
                               progress=False)
    feats, prov = ctx.features("random", None, "train", "input")
    train = ctx.images("train")
    assert data.train_loader_calls == 0 and len(feats) == 12 and prov["fid_backend"] == "random"
    assert not any(p.startswith("AUGMENTED") for p in train.path) and not bool((train.image == 1.0).all())


def test_inference_runs_once_per_dataset_and_is_seeded(tmp_path):
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), seed=5)
    model = TinyModel().eval()
    ctx = EvalContext.from_run(model=model, data=FakeData(), run=run, progress=False)
    first = ctx.inference("val")
    again = ctx.inference("val")
    assert first is again and len(model.seen) == 2  # 6 images in 2 batches, run once
    other = EvalContext.from_run(model=TinyModel().eval(), data=FakeData(), run=run, progress=False).inference("val")
    assert torch.equal(first.anomaly_map, other.anomaly_map)  # same seed -> same stochastic maps
    assert ctx.images("train").anomaly_map is None and len(model.seen) == 2  # FID reference: no model run


def test_a_context_without_a_run_uses_the_same_seeding(tmp_path):
    run = Run(run_dir=tmp_path, device=torch.device("cpu"), seed=5)
    from_run = EvalContext.from_run(model=TinyModel().eval(), data=FakeData(), run=run, progress=False)
    bare = EvalContext(model=TinyModel().eval(), data=FakeData(), device="cpu", seed=5, progress=False)
    assert bare.artifact_dir is None and from_run.artifact_dir == tmp_path / "checkpoints"
    assert torch.equal(bare.inference("lesions").anomaly_map, from_run.inference("lesions").anomaly_map)
