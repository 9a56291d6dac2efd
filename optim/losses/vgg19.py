"""Frozen VGG19 features for style (Gram) and perceptual losses, loaded offline; never trained, never saved.

The weights are torchvision's ImageNet file ``vgg19-dcbb9e9a.pth``, read from ``weights_path`` or from
``<torch.hub.get_dir()>/checkpoints/`` (``$TORCH_HOME/hub/checkpoints``); nothing is downloaded. Without the file,
:func:`build_vgg19_losses` with ``backend='auto'`` returns None and the caller switches the terms off (the documented
fallback, docs/methods.md#pretrained-feature-networks), stating so in its provenance. ``backend='random'`` (a
seeded random VGG19) exists only for wiring tests. Like ``optim.losses.perceptual``, every parameter becomes a
non-persistent buffer, so the network is in no ``state_dict``, ``parameters()`` or optimizer; gradients flow to the
inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

VGG19_FILE = "vgg19-dcbb9e9a.pth"
LAYERS = {"relu1_1": 1, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_4": 17, "relu4_1": 20, "relu4_4": 26,
          "relu5_1": 29, "relu5_2": 31}
STYLE_LAYERS = ("relu2_2", "relu3_4", "relu4_4", "relu5_2")
PERCEPTUAL_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
Backend = Literal["auto", "torchvision", "random"]


class VGG19Losses(nn.Module):
    """Style and perceptual distances on VGG19 ReLU features (inputs [B,1,H,W] in [0,1], ImageNet-normalised).

    Attributes:
        backend_name: what was loaded (the file, or "RANDOM weights (tests only)").
    """

    def __init__(self, features: nn.Sequential, backend_name: str) -> None:
        super().__init__()
        self.features = features
        for module in list(self.features.modules()):
            for name, param in list(module.named_parameters(recurse=False)):
                delattr(module, name)
                module.register_buffer(name, param.detach(), persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.backend_name = backend_name
        super().train(False)

    def train(self, mode: bool = True) -> VGG19Losses:
        return super().train(False)

    def _features(self, x: Tensor) -> dict[str, Tensor]:
        h = (x.float().expand(-1, 3, -1, -1) - self.mean) / self.std
        out: dict[str, Tensor] = {}
        wanted = {index: name for name, index in LAYERS.items()}
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in wanted:
                out[wanted[index]] = h
        return out

    def forward(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """(style, perceptual) distances between a and b ([B,1,H,W] in [0,1]); scalars, differentiable in a and b.

        style = sum over relu2_2/3_4/4_4/5_2 of L1(Gram(a), Gram(b)), Gram = F F^T / (C H W);
        perceptual = sum over relu1_1/2_1/3_1/4_1/5_1 of L1(features(a), features(b)).
        """
        with torch.autocast(a.device.type, enabled=False):
            fa, fb = self._features(a), self._features(b)
            style = sum(F.l1_loss(_gram(fa[n]), _gram(fb[n])) for n in STYLE_LAYERS)
            perceptual = sum(F.l1_loss(fa[n], fb[n]) for n in PERCEPTUAL_LAYERS)
        return style, perceptual  # type: ignore[return-value]


def _gram(f: Tensor) -> Tensor:
    b, c, h, w = f.shape
    flat = f.reshape(b, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def build_vgg19_losses(*, backend: Backend = "auto", weights_path: str | None = None) -> VGG19Losses | None:
    """The VGG19 loss network, or None when ``backend='auto'`` finds no weights file.

    Raises:
        FileNotFoundError: ``backend='torchvision'`` (or an explicit ``weights_path``) and no such file.
        ValueError: an unknown backend.
    """
    from torchvision.models import vgg19

    if backend not in ("auto", "torchvision", "random"):
        raise ValueError(f"vgg backend={backend!r} is not one of 'auto', 'torchvision', 'random'")
    net = vgg19()
    features = net.features[: LAYERS["relu5_2"] + 1]
    if backend == "random":
        generator = torch.Generator().manual_seed(0)
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = torch.randn(module.weight.shape, generator=generator) * 0.05
                module.bias.data.zero_()
        return VGG19Losses(features, "VGG19 with RANDOM weights (seed 0; wiring tests only)")
    path = Path(weights_path).expanduser() if weights_path else Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
    if not path.is_file():
        if backend == "torchvision" or weights_path:
            raise FileNotFoundError(f"VGG19 weights not found at {path} (torchvision's {VGG19_FILE}; nothing is "
                                    "downloaded here)")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return VGG19Losses(net.features[: LAYERS["relu5_2"] + 1], f"VGG19 ImageNet weights from {path}")
