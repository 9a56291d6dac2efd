"""Typed settings of a diffusion model, each written in YAML as one sub-block of the model's ``params``.

- :class:`InferenceSetting`: which sampler runs from which noise level with how many network calls (test-time
  and validation inference alike, ``inference:`` / ``val_inference:``); the one place where the number of
  network calls is computed.
- :class:`UNetSetting`: the ``DiffusionModelUNet`` (``network:``).
- :class:`ScheduleSetting`: the (linear or cosine) beta schedule and the x0 clipping of the reverse steps
  (``schedule:``).

The noise (``noise:``) is :class:`model_zoo.diffusion.noise.DiffusionNoise`. All settings are frozen
dataclasses: a model keeps its configured setting and takes another one per call instead of being mutated.
The strict builder (``core.Configurator.build``) turns a YAML mapping into these classes key by key.

Example (``ddpm_cpu.yaml``)::

    inference: {sampler: strided, noise_level: 250, steps: 25}
    val_inference: {sampler: ddim, noise_level: 250, steps: 10}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from monai.networks.nets import DiffusionModelUNet

Sampler = Literal["ddpm", "strided", "ddim"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
BetaSchedule = Literal["linear_beta", "cosine"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)


@dataclass(frozen=True, kw_only=True)
class InferenceSetting:
    """Partial diffusion from ``noise_level`` back to the clean image with one of three samplers.

    Attributes:
        sampler: ``'ddpm'`` (the reference: every step L, L-1, ..., 0, i.e. L+1 network calls), ``'strided'``
            (the DDPM posterior over ``steps`` evenly spaced steps from L to 0) or ``'ddim'`` (Song et al.'s
            update over the same steps). Strided and DDIM are approximations and labelled so.
        noise_level: L, the step x is noised to in one shot (reference 250; AutoDDPM's L_r 200).
        steps: network calls of ``'strided'``/``'ddim'``, in [1, L+1]; must be null for ``'ddpm'``.
        eta: DDIM stochasticity (0: deterministic after the noising); must be 0 for the other samplers.
        draws: independent reconstructions (each with fresh noise) averaged into one (default 1, the reference).
            More draws lower the sampling noise of the reconstruction, and so of the map on healthy tissue, at
            ``draws`` times the network calls; an addition of this project, labelled when > 1.
    """

    sampler: Sampler = "ddpm"
    noise_level: int
    steps: int | None = None
    eta: float = 0.0
    draws: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not one of {', '.join(map(repr, SAMPLERS))}")
        if self.noise_level < 0:
            raise ValueError(f"noise_level={self.noise_level} must be >= 0")
        if self.sampler == "ddpm":
            if self.steps is not None:
                raise ValueError(f"steps={self.steps} is only for the 'strided' and 'ddim' samplers; the 'ddpm' "
                                 f"sampler calls the network at every step (noise_level + 1 = {self.noise_level + 1})")
        elif self.steps is None or not 1 <= self.steps <= self.noise_level + 1:
            raise ValueError(f"steps={self.steps} for sampler {self.sampler!r} must be in [1, noise_level + 1 = "
                             f"{self.noise_level + 1}]")
        if self.eta < 0 or (self.eta != 0 and self.sampler != "ddim"):
            raise ValueError(f"eta={self.eta} must be >= 0, and 0 unless the sampler is 'ddim'")
        if isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1:
            raise ValueError(f"draws={self.draws!r} must be an integer >= 1")

    @property
    def timesteps(self) -> list[int]:
        """The steps at which the network is called, descending from ``noise_level`` (the last one is 0).

        ``'ddpm'`` visits every step; ``'strided'``/``'ddim'`` visit ``steps`` evenly spaced ones, rounded (the
        spacing is >= 1, so rounding keeps them strictly decreasing).
        """
        if self.sampler == "ddpm":
            return list(range(self.noise_level, -1, -1))
        assert self.steps is not None  # checked in __post_init__
        if self.steps == 1:
            return [self.noise_level]
        return [round(self.noise_level - i * self.noise_level / (self.steps - 1)) for i in range(self.steps)]

    @property
    def network_calls(self) -> int:
        """Network calls of one (averaged) reconstruction per batch: ``draws`` x (L+1 for ``'ddpm'``, ``steps``
        otherwise)."""
        return self.draws * (self.noise_level + 1 if self.sampler == "ddpm" else int(self.steps or 0))

    @property
    def label(self) -> str:
        """What this setting computes, for run manifests and reports (approximations are labelled)."""
        kind = {"ddpm": "full DDPM chain", "strided": "strided DDPM (approximation)",
                "ddim": f"DDIM eta={self.eta:g} (approximation)"}[self.sampler]
        mean = f", mean of {self.draws} reconstructions" if self.draws > 1 else ""
        return f"partial diffusion from L={self.noise_level}, {kind}{mean}, {self.network_calls} network calls"

    def check_noise_level(self, num_train_timesteps: int, name: str = "inference") -> None:
        """Raise ValueError unless ``noise_level`` is a step of a schedule with ``num_train_timesteps`` steps."""
        if not 0 <= self.noise_level < num_train_timesteps:
            raise ValueError(f"{name}.noise_level={self.noise_level} must be in [0, num_train_timesteps="
                             f"{num_train_timesteps})")


@dataclass(frozen=True, kw_only=True)
class UNetSetting:
    """MONAI ``DiffusionModelUNet`` (2-D, epsilon prediction); defaults: the reference network
    (docs/methods.md#ddpm-and-anoddpm).

    Attributes:
        in_channels: image channels (also the output channels).
        channels: widths per level (reference (128, 256, 256)).
        attention_levels: self-attention per level (reference (False, True, True)); same length as ``channels``.
        num_res_blocks: residual blocks per level (1).
        num_head_channels: channels per attention head (256), one value or one per level.
        norm_num_groups: group-norm groups (32).
        use_flash_attention: PyTorch SDPA attention (faster, same function).
        resblock_updown: residual blocks for down- and upsampling instead of strided convolutions and
            interpolation (the OpenAI UNet's option; pDDPM's reference network uses them).
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (128, 256, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = 1
    num_head_channels: int | tuple[int, ...] = 256
    norm_num_groups: int = 32
    use_flash_attention: bool = False
    resblock_updown: bool = False

    def __post_init__(self) -> None:
        # YAML lists become tuples, so the setting stays hashable and immutable
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if not isinstance(self.num_head_channels, int):
            object.__setattr__(self, "num_head_channels", tuple(self.num_head_channels))
        if len(self.channels) != len(self.attention_levels):
            raise ValueError(f"channels {self.channels} and attention_levels {self.attention_levels} must have the "
                             "same length")

    def build(self) -> DiffusionModelUNet:
        """A freshly initialised ``DiffusionModelUNet`` (global RNG) with this setting."""
        return DiffusionModelUNet(
            spatial_dims=2, in_channels=self.in_channels, out_channels=self.in_channels, channels=self.channels,
            attention_levels=self.attention_levels, num_res_blocks=self.num_res_blocks,
            num_head_channels=self.num_head_channels, norm_num_groups=self.norm_num_groups,
            use_flash_attention=self.use_flash_attention, resblock_updown=self.resblock_updown,
        )


@dataclass(frozen=True, kw_only=True)
class ScheduleSetting:
    """The noise schedule (reference: linear, T = 1000, betas 1e-4 -> 2e-2) and the reverse steps' x0 clipping.

    Attributes:
        num_train_timesteps: T.
        beta_schedule: MONAI's ``'linear_beta'`` (DDPM) or ``'cosine'`` (Nichol & Dhariwal, s = 0.008, betas
            clipped at 0.999; pDDPM).
        beta_start, beta_end: the linear betas' ends (``'linear_beta'`` only; the cosine schedule has none).
        x0_clip: range the predicted x0 is clipped to in every reverse step (reference [-1, 1]), or None.
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear_beta"
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    x0_clip: tuple[float, float] | None = (-1.0, 1.0)

    def __post_init__(self) -> None:
        if self.x0_clip is not None:
            if not self.x0_clip[0] < self.x0_clip[1]:
                raise ValueError(f"x0_clip={self.x0_clip!r} must be (low, high) with low < high")
            object.__setattr__(self, "x0_clip", (float(self.x0_clip[0]), float(self.x0_clip[1])))
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 1")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={self.beta_schedule!r} is not one of "
                             f"{', '.join(map(repr, BETA_SCHEDULES))}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"betas ({self.beta_start}, {self.beta_end}) must satisfy 0 < beta_start <= beta_end < 1")


@dataclass(frozen=True, kw_only=True)
class RepaintSetting:
    """RePaint re-sampling inside a mask (AutoDDPM's step 5), see :func:`model_zoo.diffusion.procedures.repaint`.

    Attributes:
        noise_level: L_i >= 1, the step the start image is noised to (reference 50).
        resample_steps: U, repeats per step (reference 5).
    """

    noise_level: int = 50
    resample_steps: int = 5

    def __post_init__(self) -> None:
        if self.noise_level < 1:
            raise ValueError(f"noise_level={self.noise_level} must be >= 1 (re-sampling runs t = L_i..1)")
        if self.resample_steps < 1:
            raise ValueError(f"resample_steps={self.resample_steps} must be >= 1")

    @property
    def network_calls(self) -> int:
        """Network calls of one re-sampling (per batch): L_i * U (t = L_i..1)."""
        return self.noise_level * self.resample_steps

    @property
    def label(self) -> str:
        return f"RePaint from L_i={self.noise_level} with U={self.resample_steps}, {self.network_calls} network calls"

    def check_noise_level(self, num_train_timesteps: int, name: str = "repaint") -> None:
        """Raise ValueError unless ``noise_level`` is a step of a schedule with ``num_train_timesteps`` steps."""
        if not 0 <= self.noise_level < num_train_timesteps:
            raise ValueError(f"{name}.noise_level={self.noise_level} must be in [0, num_train_timesteps="
                             f"{num_train_timesteps})")
