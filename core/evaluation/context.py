"""What tasks see: the model's outputs per dataset (computed once, cached), and shared feature networks.

Besides the outputs, the context records what the evaluation's numbers rest on:

- :attr:`EvalContext.cost`: per dataset the model ran on, seconds per image of ``get_anomaly`` (wall clock,
  CUDA synchronised; data loading excluded; a model's lazy set-up on its first batch included) and, when the
  model names a network in :meth:`model_zoo.base.AnomalyModel.counted_network`, its forward calls per image (a
  batched call counts once for every image in the batch);
- :attr:`EvalContext.backends`: every feature network actually used (``rqi_caci_lpips``, ``fid_network``) and,
  through :meth:`EvalContext.model_settings`, the model's own backends (``model.provenance()``), its
  inference label and, for a :class:`~model_zoo.base.MaskThresholdModel`, its mask threshold and where it came
  from. A fallback chosen by ``backend: auto`` (ST-LPIPS for LPIPS, the fid-helper TorchScript for the FID
  Inception) logs a WARNING once per process;
- :attr:`EvalContext.mask_calibration`: the run's calibrated mask threshold (from the ``mask_calibration`` task),
  passed to every ``get_anomaly`` of a model that needs one (the model never stores it);
- Inception features of inputs (never of reconstructions) can be cached on disk across runs
  (:mod:`optim.feature_cache`), keyed by content, backend, weights, resolution and device type.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor
from tqdm import tqdm

from core.data_module import DatasetInfo
from core.evaluation.protocols import DataSource
from core.evaluation.thresholds import MaskCalibration, describe_mask_threshold
from model_zoo.base import AnomalyModel, AnomalyOutput, MaskThresholdModel
from model_zoo.registry import stage1_problem

if TYPE_CHECKING:
    from dl_utils.run import Run
    from optim.inception import InceptionFeatures
    from optim.losses.perceptual import PerceptualDistance

logger = logging.getLogger(__name__)

INCEPTION_RESOLUTION = 299  # optim.inception resizes every input to 299x299 (the random test net keeps the size)
_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log ``message`` as a WARNING the first time it occurs in this process."""
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


@dataclass
class Inference:
    """One dataset's images and the model's outputs, on the CPU; tensors [N,1,H,W] unless stated.

    Attributes:
        name: dataset name; info: its ``data.dataset_info``.
        image: inputs in [0,1]; anomaly_map: >= 0; anomaly_score: [N]; reconstruction: in [0,1] or None;
        anomaly_mask, brain_mask: {0,1} or None; label: [N] long; path: N source paths; subject: N subject ids
        (slices of one volume share one; the image path when the split names no subjects).
        extras: the model's per-image intermediates (``AnomalyOutput.extras`` with a leading batch dimension, e.g.
            AutoDDPM's ``x_rec``, ``c``, ``mask``, ``stitched``, ``x_inp``), concatenated, float32.
    """

    name: str
    image: Tensor
    anomaly_map: Tensor | None
    anomaly_score: Tensor | None
    reconstruction: Tensor | None
    anomaly_mask: Tensor | None
    brain_mask: Tensor | None
    label: Tensor
    path: list[str]
    info: DatasetInfo | None = None
    subject: list[str] = field(default_factory=list)
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.image.shape[0]

    def evaluation_region(self, region: Literal["brain", "all"] = "brain") -> Tensor | None:
        """The pixels the segmentation metrics count: for ``'brain'``, brain mask OR anomaly mask ([N,1,H,W] in
        {0,1}) when the set has both; otherwise None (every pixel)."""
        if region == "brain" and self.brain_mask is not None and self.anomaly_mask is not None:
            return ((self.brain_mask + self.anomaly_mask) > 0).float()
        return None

    @property
    def healthy_tissue(self) -> Tensor:
        """Brain (or healthy-tissue) mask minus the anomaly mask; without a brain mask: everything but the anomaly."""
        base = self.brain_mask if self.brain_mask is not None else torch.ones_like(self.image)
        return base if self.anomaly_mask is None else base * (1.0 - self.anomaly_mask)


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    if not parts or any(p is None for p in parts):
        return None
    return torch.cat(parts)  # type: ignore[arg-type]


class EvalContext:
    """What tasks use: cached inference per dataset, perceptual and Inception networks.

    Args:
        model: the trained model in eval mode on ``device``.
        data: the data source (evaluation never sees training augmentation: only ``eval_dataloader``).
        device: where the model runs.
        seed: every dataset's inference gets its own generator seeded with it, so results do not depend on
            the order of the tasks.
        artifact_dir: where artifacts (``thresholds.json``) are written and read (the run's checkpoint folder),
            or None to keep them in memory only.
        progress: show tqdm bars (only on a TTY).
        mask_calibration: a calibrated mask threshold to start with (else the ``mask_calibration`` task's).

    Raises:
        TypeError: ``model`` is not an :class:`~model_zoo.base.AnomalyModel` (a stage-1 network does not score).
    """

    def __init__(self, *, model: AnomalyModel, data: DataSource, device: torch.device | str, seed: int = 0,
                 artifact_dir: Path | None = None, progress: bool = True,
                 mask_calibration: MaskCalibration | None = None) -> None:
        if not isinstance(model, AnomalyModel):
            raise TypeError(f"the evaluation needs an AnomalyModel: {stage1_problem(type(model))}")
        self.model, self.data = model, data
        self.mask_calibration = mask_calibration
        self.device = torch.device(device)
        self.seed = int(seed)
        self.artifact_dir = artifact_dir
        self.progress = progress and sys.stderr.isatty()
        self._inference: dict[str, Inference] = {}
        self._images: dict[str, Inference] = {}
        self._perceptual: dict[str, PerceptualDistance] = {}
        self._inception: dict[tuple[str, str | None], InceptionFeatures] = {}
        self._features: dict[tuple[str, str | None, str, str, int | None], Tensor] = {}
        self.cost: dict[str, dict[str, float]] = {}
        self.backends: dict[str, str] = {}
        self.feature_cache_log: list[tuple[str, str, str]] = []

    @classmethod
    def from_run(cls, *, model: AnomalyModel, data: DataSource, run: Run, progress: bool = True
                 ) -> EvalContext:
        """The context of a run: its device and seed, artifacts in ``run.checkpoint_dir``."""
        return cls(model=model, data=data, device=run.device, seed=run.seed, artifact_dir=Path(run.checkpoint_dir),
                   progress=progress)

    # -------------------------------------------------------------------------------------------- datasets
    @property
    def test_sets(self) -> list[str]:
        return list(self.data.test_set_names)

    def resolve(self, datasets: Sequence[str] | None) -> list[str]:
        """``None`` -> all test sets; otherwise the names, checked to exist."""
        known = self.test_sets
        if datasets is None:
            return known
        for name in datasets:
            if name not in known and name not in ("train", "val"):
                raise ValueError(f"dataset {name!r} is not a test set; test sets: {', '.join(known)}")
        return list(datasets)

    def info(self, name: str) -> DatasetInfo:
        return self.data.dataset_info(name)

    def _load(self, name: str, *, run_model: bool) -> Inference:
        loader = self.data.eval_dataloader(name)
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        parts: dict[str, list] = {k: [] for k in ("image", "anomaly_mask", "brain_mask", "label", "path", "subject",
                                                  "anomaly_map", "anomaly_score", "reconstruction")}
        what = "inference" if run_model else "loading"
        counted = self.model.counted_network() if run_model else None
        calls = [0]

        def count(*_: object) -> None:
            calls[0] += 1

        hook = None if counted is None else counted.register_forward_pre_hook(count)
        seconds, image_calls, n_images = 0.0, 0, 0
        extras: dict[str, list[Tensor]] = {}
        try:
            for batch in tqdm(loader, desc=f"{what} {name}", disable=not self.progress, leave=False):
                for key in ("image", "anomaly_mask", "brain_mask", "label"):
                    value = getattr(batch, key)
                    parts[key].append(None if value is None else value.detach().cpu())
                parts["path"].extend(batch.path)
                parts["subject"].extend(batch.subject)
                if not run_model:
                    continue
                x = batch.image.to(self.device)
                before, start = calls[0], time.perf_counter()
                with torch.no_grad():
                    out = self.anomaly(x, generator=generator)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                seconds += time.perf_counter() - start
                image_calls += (calls[0] - before) * x.shape[0]
                n_images += x.shape[0]
                parts["anomaly_map"].append(out.anomaly_map.detach().float().cpu())
                parts["anomaly_score"].append(out.anomaly_score.detach().float().cpu())
                rec = out.reconstruction
                parts["reconstruction"].append(None if rec is None else rec.detach().float().cpu())
                for key, value in out.extras.items():
                    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == x.shape[0]:
                        extras.setdefault(key, []).append(value.detach().float().cpu())
        finally:
            if hook is not None:
                hook.remove()
        if not parts["image"]:
            raise ValueError(f"dataset {name!r} is empty")
        if run_model:
            self.cost[name] = {"s_per_image": seconds / n_images, "n_images": float(n_images)}
            if counted is not None:
                self.cost[name]["network_calls"] = image_calls / n_images
        info = self.info(name)
        return Inference(name=name, image=torch.cat(parts["image"]).float(), anomaly_map=_cat(parts["anomaly_map"]),
                         anomaly_score=_cat(parts["anomaly_score"]), reconstruction=_cat(parts["reconstruction"]),
                         anomaly_mask=_cat(parts["anomaly_mask"]), brain_mask=_cat(parts["brain_mask"]),
                         label=torch.cat(parts["label"]), path=parts["path"], info=info, subject=parts["subject"],
                         extras={k: torch.cat(v) for k, v in extras.items() if len(v) == len(parts["image"])})

    def anomaly(self, x: Tensor, *, generator: torch.Generator) -> AnomalyOutput:
        """``model.get_anomaly(x, generator=generator)``, with the run's calibrated mask threshold for a model that
        needs one (:class:`~model_zoo.base.MaskThresholdModel`): the one place the evaluation runs the model."""
        if isinstance(self.model, MaskThresholdModel) and self.model.needs_mask_threshold:
            value = None if self.mask_calibration is None else self.mask_calibration.value
            return self.model.get_anomaly(x, generator=generator, mask_threshold=value)
        return self.model.get_anomaly(x, generator=generator)

    def use_mask_calibration(self, calibration: MaskCalibration) -> None:
        """Take ``calibration`` as the run's mask threshold from now on; outputs computed before are dropped (the
        runner runs the ``mask_calibration`` task before any other, so normally there are none)."""
        self.mask_calibration = calibration
        logger.info("evaluation: mask threshold tau = %g (at FPR %g on '%s', %d images)", calibration.value,
                    calibration.target_fpr, calibration.dataset, calibration.n_images)
        for name in self._inference:
            self.cost.pop(name, None)
        self._inference.clear()

    def inference(self, name: str) -> Inference:
        """Model outputs on a dataset (``'train'``, ``'val'`` or a test set), computed once and cached.

        Each dataset gets its own generator seeded with ``seed`` on ``device``.
        """
        if name not in self._inference:
            logger.info("evaluation: running the model on %r", name)
            self.model.eval()
            self._inference[name] = self._load(name, run_model=True)
        return self._inference[name]

    def images(self, name: str) -> Inference:
        """A dataset's images and masks without running the model (e.g. the healthy training set for FID)."""
        if name in self._inference:
            return self._inference[name]
        if name not in self._images:
            self._images[name] = self._load(name, run_model=False)
        return self._images[name]

    # -------------------------------------------------------------------------------------------- networks
    def perceptual(self, backend: str) -> PerceptualDistance:
        """The LPIPS network of RQI/CACI for ``backend`` (built once); recorded in :attr:`backends`."""
        if backend not in self._perceptual:
            net = make_perceptual(backend).to(self.device).eval()
            self._perceptual[backend] = net
            if backend == "auto" and not net.backend_name.startswith("lpips/"):
                warn_once(f"RQI/CACI LPIPS: the official LPIPS backbone is missing; backend 'auto' uses "
                          f"{net.backend_name} instead (a different metric; labelled in the manifest and report)")
            self._record("rqi_caci_lpips", backend, net.backend_name)
        return self._perceptual[backend]

    def perceptual_distance(self, backend: str, x: Tensor, y: Tensor, *, spatial: bool = False,
                            batch_size: int = 32) -> Tensor:
        """LPIPS between x and y ([N,1,H,W] in [0,1], on the CPU): [N] (or [N,1,H,W] maps), on the CPU."""
        net = self.perceptual(backend)
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], batch_size):
                a, b = x[i:i + batch_size].to(self.device), y[i:i + batch_size].to(self.device)
                outs.append((net.spatial(a, b) if spatial else net(a, b)).float().cpu())
        return torch.cat(outs)

    def inception(self, backend: str, weights_path: str | None) -> InceptionFeatures:
        """The FID feature network (built once per backend and weights); recorded in :attr:`backends`."""
        key = (backend, weights_path)
        if key not in self._inception:
            net = make_inception(backend, weights_path, self.device)
            self._inception[key] = net
            if backend == "auto" and net.backend_name == "fid_helper":
                warn_once("FID: neither the torchvision nor the pytorch-fid Inception weights are present; backend "
                          f"'auto' uses the fid-helper TorchScript network ({net.provenance['fid_weights']}); "
                          "labelled in the manifest and report")
            self._record("fid_network", backend, f"{net.backend_name} ({net.provenance['fid_weights']})")
        return self._inception[key]

    def _record(self, what: str, requested: str, used: str) -> None:
        """Note a network in :attr:`backends`; a second, different one of the same kind is keyed by its request."""
        key = what if self.backends.get(what, used) == used else f"{what} ({requested})"
        self.backends[key] = used

    def features(self, backend: str, weights_path: str | None, name: str, kind: Literal["input", "reconstruction"],
                 limit: int | None = None, *, cache_dir: Path | None = None) -> tuple[Tensor, dict[str, str]]:
        """Inception features of a dataset's inputs or reconstructions ([n, d] float64), cached in memory.

        Args:
            backend, weights_path: the Inception network (see optim.inception).
            name: the dataset; kind: its inputs or the model's reconstructions of them.
            limit: only the first ``limit`` images (None: all).
            cache_dir: on-disk feature cache for inputs (never for reconstructions, which depend on the model);
                None: no disk cache. Hits and misses are logged and kept in :attr:`feature_cache_log`.
        """
        net = self.inception(backend, weights_path)
        key = (backend, weights_path, name, kind, limit)
        if key not in self._features:
            source = self.images(name) if kind == "input" else self.inference(name)
            images = source.image if kind == "input" else source.reconstruction
            if images is None:
                raise ValueError(f"the model returns no reconstruction; FID of restorations on {name!r} is undefined")
            images = images[:limit] if limit else images
            if cache_dir is not None and kind == "input":
                self._features[key] = self._cached_features(net, images, name, cache_dir)
            else:
                logger.info("Inception features (%s) of %r %ss: %d images", net.backend_name, name, kind, len(images))
                self._features[key] = net.features(images)
        return self._features[key], dict(net.provenance)

    def _cached_features(self, net: InceptionFeatures, images: Tensor, name: str, cache_dir: Path) -> Tensor:
        from optim.feature_cache import cached_features

        computed: list[int] = []

        def extract(x: Tensor) -> Tensor:
            computed.append(len(x))
            logger.info("Inception features (%s) of %r inputs: %d images", net.backend_name, name, len(x))
            return net.features(x)

        resolution = list(images.shape[-2:]) if net.backend_name == "random" else INCEPTION_RESOLUTION
        key_parts = {"backend": net.backend_name, "weights": net.provenance["fid_weights"],
                     "resolution": str(resolution), "device": self.device.type}
        features = cached_features(images, extractor=extract, key_parts=key_parts, cache_dir=cache_dir)
        self.feature_cache_log.append((name, "miss" if computed else "hit", str(cache_dir)))
        return features

    def model_settings(self) -> dict[str, str]:
        """The model's own backends (``model.provenance()``, keys prefixed ``model_``), its inference label and,
        for a :class:`~model_zoo.base.MaskThresholdModel`, ``model_mask_threshold`` (the value and its source)."""
        settings = {f"model_{k}": str(v) for k, v in self.model.provenance().items()}
        label = self.model.inference_label()
        if label:
            settings["model_inference"] = str(label)
        if isinstance(self.model, MaskThresholdModel):
            settings["model_mask_threshold"] = describe_mask_threshold(self.model, self.mask_calibration)
        return settings

    def all_backends(self) -> dict[str, str]:
        """:attr:`backends` (feature networks used so far) and :meth:`model_settings`, sorted by key."""
        return dict(sorted({**self.backends, **self.model_settings()}.items()))


def make_perceptual(backend: str) -> PerceptualDistance:
    """The LPIPS(AlexNet) distance of the project (optim.losses.perceptual), for RQI and CACI."""
    from optim.losses.perceptual import PerceptualDistance

    return PerceptualDistance(net="alex", backend=backend)


def make_inception(backend: str, weights_path: str | None, device: torch.device) -> InceptionFeatures:
    """The Inception feature network for FID/KID (optim.inception)."""
    from optim.inception import InceptionFeatures

    return InceptionFeatures(backend=backend, weights_path=weights_path, device=device)
