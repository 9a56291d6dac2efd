"""Learned perceptual distance (LPIPS) that never downloads anything.

Three ways to get the network, chosen by ``backend`` and recorded in :attr:`PerceptualDistance.backend_name`:

- ``'lpips'``: the official ``lpips`` 0.1.4 package (Zhang et al., 2018): its calibrated linear heads ship with the
  package; the ImageNet backbone is the official torchvision file (``alexnet-owt-7be5be79.pth``,
  ``squeezenet1_1-b8a52dc0.pth`` or ``vgg16-397923af.pth``), read from ``weights_path`` or from
  ``<torch.hub.get_dir()>/checkpoints/<file>`` (``$TORCH_HOME/hub/checkpoints``). ``lpips`` itself would ask
  torchvision to download it; we build it with a random backbone (``pnet_rand=True``) and load the file ourselves,
  strictly, mapping torchvision's ``features.<i>.*`` keys onto lpips' ``slice<k>.<i>.*``.
- ``'stlpips'``: shift-tolerant LPIPS (Ghildyal & Liu, 2022) from the ``stlpips-pytorch`` wheel, whose weights
  (backbone and heads) ship inside the wheel. It is a *different metric* from LPIPS; its numbers are labelled so.
  The wheel has ``alex`` and ``vgg`` only; ``squeeze`` falls back to ``alex`` (SqueezeNet was designed as an
  AlexNet-accuracy network with AlexNet-like early receptive fields), and :attr:`backend_name` says so.
- ``'random'``: lpips' official heads on a randomly initialised (seeded, deterministic) backbone. Tests only.
- ``'auto'``: ``'lpips'`` when the backbone file exists, otherwise ``'stlpips'``.

Once built, every parameter of the network is turned into a non-persistent buffer: nothing can train it, it never
appears in a host model's ``state_dict`` or ``parameters()`` (so checkpoints and optimisers ignore it, as the house
style asks for injected perceptual networks) and it still follows ``.to(device)``. Gradients do flow to the
*inputs*, so the module can serve as a loss. It always stays in eval mode (lpips' heads contain dropout).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dl_utils.resample import at_size, working_size

logger = logging.getLogger(__name__)

Net = Literal["alex", "squeeze", "vgg"]
Backend = Literal["auto", "lpips", "stlpips", "random"]

#: Official torchvision ImageNet backbone files, as torchvision names them in ``$TORCH_HOME/hub/checkpoints``.
BACKBONE_FILES: dict[str, str] = {
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
    "vgg": "vgg16-397923af.pth",
}
#: Which ST-LPIPS network stands in for each requested net (the wheel ships alex and vgg only).
STLPIPS_CLOSEST: dict[str, str] = {"alex": "alex", "vgg": "vgg", "squeeze": "alex"}
_SEED = 0  # seed of the random backbone (backend 'random'), so that two instances agree


def default_backbone_path(net: Net) -> Path:
    """Where torchvision would cache the official backbone of ``net``: ``<torch.hub.get_dir()>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


class PerceptualDistance(nn.Module):
    """LPIPS-style perceptual distance between two image batches, frozen and offline.

    Args:
        net: backbone, ``'alex'`` (evaluation metrics), ``'squeeze'`` (AutoDDPM) or ``'vgg'``.
        backend: ``'auto'``, ``'lpips'``, ``'stlpips'`` or ``'random'`` (see the module docstring).
        weights_path: the official torchvision backbone file for ``backend`` ``'lpips'``/``'auto'``; ``None`` means
            ``<torch.hub.get_dir()>/checkpoints/<official file name>``. A path given here must exist.
        spatial_size: ``None`` (default): :meth:`spatial` runs on the images as given. An int S: :meth:`spatial`
            resizes both images (bilinear) to S x S, and its map back to the input size (area average). The
            backbones downsample by 16-32, so on small slices (32x32, 64x64) their deepest maps are one or a few
            cells; at 128 (the study's size) they resolve lesions again. Part of ``backend_name``.

    Attributes:
        backend_name: what is actually computed, e.g. ``"lpips/squeeze (official weights from /path)"``; put it
            next to every number this module produces.

    Raises:
        ValueError: a bad ``net``/``backend``, a ``weights_path`` with ``'stlpips'``/``'random'``, or a backbone
            file that does not match the net.
        FileNotFoundError: ``backend='lpips'`` (or an explicit ``weights_path``) and the file does not exist.
    """

    def __init__(self, *, net: Net = "alex", backend: Backend = "auto", weights_path: str | None = None,
                 spatial_size: int | None = None) -> None:
        super().__init__()
        spatial_size = working_size(spatial_size, name="spatial_size", minimum=32)
        if net not in get_args(Net):
            raise ValueError(f"net={net!r} is not one of {', '.join(map(repr, get_args(Net)))}")
        if backend not in get_args(Backend):
            raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, get_args(Backend)))}")
        if weights_path is not None and backend in ("stlpips", "random"):
            raise ValueError(f"weights_path={weights_path!r} is not used by backend {backend!r}; remove it")
        if weights_path is not None and not Path(weights_path).expanduser().is_file():
            raise FileNotFoundError(f"weights_path={weights_path!r}: no such file (official torchvision "
                                    f"{net} backbone {BACKBONE_FILES[net]!r} expected)")
        path = Path(weights_path).expanduser() if weights_path is not None else default_backbone_path(net)
        if backend == "auto":
            backend = "lpips" if path.is_file() else "stlpips"
        if backend == "lpips":
            if not path.is_file():
                raise FileNotFoundError(
                    f"backend='lpips' needs the official torchvision {net} backbone at {path} (nothing is downloaded "
                    f"here); put {BACKBONE_FILES[net]!r} there, pass weights_path, or use backend 'auto'/'stlpips'"
                )
            model, normalize = _build_lpips(net, backbone=path)
            self.backend_name = f"lpips/{net} (official weights from {path})"
        elif backend == "random":
            model, normalize = _build_lpips(net, backbone=None)
            self.backend_name = f"lpips/{net} with a RANDOM backbone (seed {_SEED}; tests only, not a metric)"
        else:
            model, normalize, st_net = _build_stlpips(net)
            substitute = "" if st_net == net else f", standing in for {net!r} which ST-LPIPS does not ship"
            self.backend_name = (f"stlpips/{st_net} shift-tolerant{substitute} (offline fallback; a different metric "
                                 f"from LPIPS)")
        if spatial_size is not None:
            self.backend_name += f"; spatial map computed at {spatial_size}x{spatial_size}"
        self.spatial_size = spatial_size
        _freeze_as_buffers(model)
        self.model = model
        self._normalize = normalize
        self.net_name: str = net
        super().train(False)
        logger.info("perceptual distance: %s", self.backend_name)

    def train(self, mode: bool = True) -> PerceptualDistance:
        """Stay in eval mode whatever a host model asks: the frozen metric must not switch dropout on."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Perceptual distance per image.

        Args:
            x: [B,1,H,W] or [B,3,H,W] in [0,1] (mapped to [-1,1] inside; gray is repeated to 3 channels).
            y: same shape as ``x``, in [0,1].

        Returns:
            [B] distances, >= 0 (0 for identical images), on ``x.device``.
        """
        return torch.stack([m.mean(dim=(1, 2, 3)) for m in self._layer_maps(x, y)]).sum(dim=0)

    def spatial(self, x: Tensor, y: Tensor) -> Tensor:
        """Spatial perceptual-distance map (lpips' ``spatial=True``): per-layer maps upsampled and summed.

        Args:
            x: [B,1,H,W] or [B,3,H,W] in [0,1].
            y: same shape as ``x``, in [0,1].

        Returns:
            [B,1,H,W] map, >= 0, bilinearly upsampled (align_corners=False) to the input size, or with
            ``spatial_size`` S: computed on the images resized to S x S and area-resized back to H x W.
        """
        return at_size(self._spatial, self.spatial_size, x, y)

    def _spatial(self, x: Tensor, y: Tensor) -> Tensor:
        maps = [F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)
                for m in self._layer_maps(x, y)]
        return torch.stack(maps).sum(dim=0)

    def _layer_maps(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Per-layer weighted squared differences of unit-normalised features, each [B,1,h_l,w_l]."""
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"inputs must be [B,1,H,W] or [B,3,H,W] in [0,1], got {tuple(x.shape)}")
        both = torch.cat([x, y]) * 2.0 - 1.0  # one pass through the backbone for x and y
        if both.shape[1] == 1:
            both = both.expand(-1, 3, -1, -1)
        features = self.model.net(self.model.scaling_layer(both))
        batch = x.shape[0]
        maps = []
        for head, feat in zip(self.model.lins, features, strict=True):
            unit = self._normalize(feat)
            maps.append(head((unit[:batch] - unit[batch:]).pow(2)))
        return maps


@dataclass(frozen=True, kw_only=True)
class PerceptualSetting:
    """How to build a :class:`PerceptualDistance`, as a typed YAML sub-block (e.g. AutoDDPM's ``perceptual``).

    A model holding the setting builds the network in its constructor (:meth:`build`) and keeps it out of its
    ``state_dict``; another network can be injected instead.

    Attributes:
        net, backend, weights_path, spatial_size: as :class:`PerceptualDistance`.
    """

    net: Net = "alex"
    backend: Backend = "auto"
    weights_path: str | None = None
    spatial_size: int | None = None

    def build(self) -> PerceptualDistance:
        """A new frozen :class:`PerceptualDistance` (on the CPU), built without touching the global RNG, so a host
        model that builds it in its constructor draws the same initial weights and training noise as without."""
        with torch.random.fork_rng(devices=[]):
            return PerceptualDistance(net=self.net, backend=self.backend, weights_path=self.weights_path,
                                      spatial_size=self.spatial_size)


def _build_lpips(net: Net, *, backbone: Path | None) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """Official lpips with its shipped linear heads and either the torchvision backbone file or a seeded random one."""
    import lpips

    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # lpips passes torchvision's deprecated ``pretrained=`` flag; pnet_rand=True makes it False (no download).
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        torch.manual_seed(_SEED)
        model = lpips.LPIPS(net=net, pretrained=False, pnet_rand=True, verbose=False)
    heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    # the file names the heads lin<k>.*; lpips also aliases them as the ModuleList ``lins``
    _load_strict(model.lins, {key.removeprefix("lin"): value for key, value in heads.items()}, heads_path)
    if backbone is not None:
        _load_torchvision_backbone(model.net, backbone, net)
    return model, lpips.normalize_tensor


def _load_torchvision_backbone(pnet: nn.Module, path: Path, net: str) -> None:
    """Load torchvision's ``features.<i>.*`` weights into lpips' ``slice<k>.<i>.*`` (same layer index), strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    slice_of = {key.split(".")[1]: key.split(".")[0] for key in pnet.state_dict()}  # layer index -> slice name
    mapped = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue  # the classifier head is not part of LPIPS
        index, rest = key.removeprefix("features.").split(".", 1)
        if index not in slice_of:
            raise ValueError(f"{path}: layer features.{index} has no place in lpips' {net} backbone; "
                             f"is this the official torchvision file {BACKBONE_FILES[net]!r}?")
        mapped[f"{slice_of[index]}.{index}.{rest}"] = value
    _load_strict(pnet, mapped, path)


def _build_stlpips(net: Net) -> tuple[nn.Module, Callable[[Tensor], Tensor], str]:
    """ST-LPIPS (shift-tolerant) with the weights shipped in the ``stlpips-pytorch`` wheel."""
    from stlpips_pytorch import stlpips, utils

    st_net = STLPIPS_CLOSEST[net]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(pretrained|weight enum).*", category=UserWarning)
        model = stlpips.LPIPS(net=st_net, variant="shift_tolerant", pretrained=False, verbose=False)
    path = Path(stlpips.__file__).parent / "weights" / "vST0.0" / f"{st_net}_shift_tolerant.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    # the file names the heads lin<k>.*; the model also aliases them as ``lins.<k>.*``
    state.update({f"lins.{key.removeprefix('lin')}": value for key, value in state.items() if key.startswith("lin")})
    _load_strict(model, state, path)
    return model, utils.normalize_tensor, st_net


def _load_strict(module: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the network: {err}") from err


def _freeze_as_buffers(module: nn.Module) -> None:
    """Make every parameter and buffer a non-persistent buffer: frozen, outside state_dict, still moved by .to()."""
    for sub in module.modules():
        tensors = {name: p.detach() for name, p in sub.named_parameters(recurse=False)}
        tensors.update(sub.named_buffers(recurse=False))
        for name, tensor in tensors.items():
            delattr(sub, name)
            sub.register_buffer(name, tensor, persistent=False)
