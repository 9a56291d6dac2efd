"""Performance benchmark: DDPM training, AnoDDPM / AutoDDPM inference, LPIPS / FID features, data loading.

Everything is built through the project's classes (``model_zoo.ddpm.DDPM``, ``model_zoo.autoddpm.AutoDDPM``,
``core.Trainer.Trainer.training_step``, ``optim.losses.perceptual.PerceptualDistance``,
``optim.inception.InceptionFeatures``, ``tools.loader_benchmark.loader_throughput``), never copies of them.

Two paths are compared on the same machine, with the same weights and the same noise generator:

- ``plain``: float32, MONAI's own attention (no SDPA/flash), contiguous (NCHW) tensors, no ``torch.compile``,
  Adam without ``fused``;
- ``fast``: bfloat16 autocast on CUDA (float32 on the CPU, where the DDPM's ``autocast_dtype='auto'`` keeps
  float32), SDPA/flash attention (``use_flash_attention=True``), channels-last on CUDA (it helps convolutions
  under bf16 there; on the CPU it is off unless ``--channels-last on``), fused Adam on CUDA, and
  ``torch.compile`` only with ``--compile``.

Each entry of the JSON carries the device name, the torch version and the settings it ran with. Times are
medians over repeats after warm-up; on CUDA they are measured with CUDA events after ``torch.cuda.synchronize``.
The plain and the fast path are timed in turn (plain, fast, plain, fast, ...) so that the load of a shared
machine drifts over both alike.
Peak memory is ``torch.cuda.max_memory_allocated`` per measurement on CUDA; on the CPU it is the process's
maximum resident set size so far (``ru_maxrss``), which only grows over the run (an upper bound per entry).

Parity: the fast path's AnoDDPM and AutoDDPM anomaly maps are compared with the plain path's (same weights, same
generator seed); the check passes when the maps agree within :data:`PARITY_TOLERANCE` for the precision the fast
path used (float32 or bfloat16), see :func:`parity_check`.

Chain lengths: the reference AnoDDPM chain is L = 250 (251 network calls) and AutoDDPM's is L_r = 200 + L_i = 50
with U = 5 (201 + 250 calls: RePaint runs t = L_i..1). ``--anoddpm-steps`` / ``--autoddpm-steps`` shorten them
(e.g. on a CPU); the entries then also report ``s_per_image_reference_chain_est``: the measured time scaled
linearly in network calls to the reference chain length (labelled as an estimate).

CLI::

    python -m tools.benchmark [--device cuda|cpu] [--smoke] [--size reference|small|tiny] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from data.batch import Batch
from dl_utils.reinit import randomize_zero_layers
from model_zoo.autoddpm import AutoDDPM
from model_zoo.autoddpm import network_calls as autoddpm_network_calls
from model_zoo.ddpm import DDPM, CompileMode
from model_zoo.diffusion.settings import InferenceSetting, RepaintSetting

if TYPE_CHECKING:
    from core.Trainer import Trainer

logger = logging.getLogger(__name__)

SizeName = Literal["reference", "small", "tiny"]
PathName = Literal["plain", "fast"]

# Agreement required between the fast and the plain path's anomaly maps (maps live in [0,1] for AnoDDPM and in
# [0,1] x c for AutoDDPM). float32 fast path: only the attention kernel and memory layout differ, so the maps must
# agree to rounding error. bfloat16 fast path: bf16 has 8 mantissa bits (relative error ~4e-3 per network call),
# which the stochastic chain carries to the end; AutoDDPM's threshold (c > tau) can then flip single mask pixels.
# So the bf16 criterion is on the mean absolute difference and on the correlation of the maps, not on their max.
PARITY_TOLERANCE: dict[str, dict[str, float]] = {
    "float32": {"max_abs": 1e-3, "mean_abs": 1e-4, "min_pearson": 0.9999},
    "bfloat16": {"max_abs": float("inf"), "mean_abs": 2e-2, "min_pearson": 0.95},
}


@dataclass(frozen=True)
class SizeSpec:
    """A benchmark size: a shipped DDPM YAML and ``--set`` overrides on it, and the batch sizes.

    The network, its noise schedule and the trainer's options are the YAML's (built through the project's strict
    builder, as a run builds them), so the benchmark times the model users train; the image side is the YAML's
    ``data.params.target_size``.

    Attributes:
        config: the YAML, relative to the repository root.
        overrides: ``a.b.c=value`` overrides (as ``--set``), e.g. a smaller network.
        train_batch: training batch size.
        infer_batches: inference batch sizes (seconds per image is reported for each).
    """

    config: str
    overrides: tuple[str, ...] = ()
    train_batch: int = 16
    infer_batches: tuple[int, ...] = (1, 16)

    @functools.cached_property
    def resolved(self) -> dict[str, Any]:
        """The resolved config (``_base_`` composed, overrides applied), read once per size; callers copy before
        changing it."""
        from core.Configurator import load_config

        return load_config(REPO_ROOT / self.config, list(self.overrides))

    def load(self) -> dict[str, Any]:
        """A fresh copy of :attr:`resolved`."""
        return copy.deepcopy(self.resolved)

    @property
    def image(self) -> int:
        """Image side: the first entry of the config's ``data.params.target_size``."""
        return int(self.load()["data"]["params"]["target_size"][0])

    def describe(self) -> dict[str, Any]:
        """The size as JSON: YAML, overrides, batch sizes, image side and the resolved network block."""
        return {**asdict(self), "image": self.image, "network": self.load()["model"]["params"]["network"]}


REPO_ROOT = Path(__file__).resolve().parents[1]
SIZES: dict[str, SizeSpec] = {
    # The reference DDPM (docs/methods.md#ddpm-and-anoddpm): 128x128, (128,256,256), attention (F,T,T), 1 res block,
    # 256 heads.
    "reference": SizeSpec("projects/normative_eval/configs/ddpm.yaml"),
    # The CPU study's DDPM, as shipped (32x32, (32,64,64)).
    "small": SizeSpec("projects/normative_eval/configs/ddpm_cpu.yaml"),
    # The CPU DDPM at a quarter of its widths (CI).
    "tiny": SizeSpec("projects/normative_eval/configs/ddpm_cpu.yaml",
                     overrides=("model.params.network.channels=[16, 32, 32]",
                                "model.params.network.num_head_channels=32", "model.params.network.norm_num_groups=8"),
                     train_batch=8),
}


@dataclass(frozen=True)
class PathSettings:
    """The speed knobs of one path.

    Attributes:
        name: ``'plain'`` or ``'fast'``.
        autocast_dtype: the DDPM's ``autocast_dtype`` (``'float32'``; ``'auto'``: bf16 on CUDA, fp32 on the CPU;
            ``'bfloat16'`` forces bf16, e.g. to check bf16 parity on a CPU).
        trainer_amp: the Trainer's ``amp`` (``'off'`` or ``'auto'``).
        flash_attention: ``use_flash_attention`` (SDPA) of the UNet.
        channels_last: channels-last memory format for the UNet and its inputs.
        fused_adam: Adam with ``fused=True``.
        torch_compile: the DDPM's ``torch_compile`` (the UNet through ``torch.compile``).
        compile_mode: its ``torch.compile`` mode (``'reduce-overhead'``: CUDA graphs).
    """

    name: PathName
    autocast_dtype: Literal["float32", "auto", "bfloat16"]
    trainer_amp: Literal["off", "auto"]
    flash_attention: bool
    channels_last: bool
    fused_adam: bool
    torch_compile: bool
    compile_mode: CompileMode = "default"

    def precision(self, device: torch.device) -> str:
        """The network's effective precision on ``device``."""
        if self.autocast_dtype == "bfloat16" or (self.autocast_dtype == "auto" and device.type == "cuda"):
            return "bfloat16"
        return "float32"


def path_settings(name: PathName, device: torch.device, *, compile_fast: bool = False,
                  channels_last: Literal["auto", "on", "off"] = "auto",
                  compile_mode: CompileMode = "default") -> PathSettings:
    """The plain or the fast path's settings on ``device`` (see the module docstring)."""
    if name == "plain":
        return PathSettings("plain", "float32", "off", False, False, False, False)
    cuda = device.type == "cuda"
    layout = cuda if channels_last == "auto" else channels_last == "on"
    return PathSettings("fast", "auto", "auto", True, layout, cuda, compile_fast, compile_mode)


@dataclass(frozen=True)
class Chains:
    """Chain lengths (network calls follow from them).

    Attributes:
        anoddpm_level: AnoDDPM's L (full DDPM chain, L+1 calls).
        autoddpm_levels: AutoDDPM's (L_r, L_i, U): (L_r+1) + L_i * U calls.
    """

    anoddpm_level: int = 250
    autoddpm_levels: tuple[int, int, int] = (200, 50, 5)

    @property
    def anoddpm(self) -> InferenceSetting:
        """AnoDDPM's inference: the full DDPM chain from L."""
        return InferenceSetting(sampler="ddpm", noise_level=self.anoddpm_level)

    @property
    def autoddpm(self) -> tuple[InferenceSetting, RepaintSetting]:
        """AutoDDPM's reconstruction (full chain from L_r) and re-sampling (L_i, U)."""
        rec, inp, repeats = self.autoddpm_levels
        return (InferenceSetting(sampler="ddpm", noise_level=rec),
                RepaintSetting(noise_level=inp, resample_steps=repeats))

    @property
    def anoddpm_calls(self) -> int:
        return self.anoddpm.network_calls

    @property
    def autoddpm_calls(self) -> int:
        return autoddpm_network_calls(*self.autoddpm)


REFERENCE_CHAINS = Chains()
SMOKE_CHAINS = Chains(anoddpm_level=4, autoddpm_levels=(3, 2, 2))


# ------------------------------------------------------------------------------------------------ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    CUDA: each call between two recorded CUDA events, read after synchronising; CPU: ``time.perf_counter``.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return times


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA peak-memory window (no-op on the CPU, whose max RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` since the last reset, or the process max RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_memory_kind": "cuda max_memory_allocated"}
    # Linux reports ru_maxrss in KiB.
    return {"peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_memory_kind": "process max RSS so far (CPU; cumulative over the run)"}


def device_info(device: torch.device) -> dict[str, Any]:
    """Device name, torch version and thread count, carried by every entry."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": str(device), "device_name": name, "torch": torch.__version__}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _images(n: int, size: int, device: torch.device, seed: int) -> Tensor:
    """[n,1,size,size] smooth random images in [0,1] (deterministic in ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, max(size // 8, 2), max(size // 8, 2), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (0.8 * smooth + 0.2 * torch.rand(n, 1, size, size, generator=generator)).clamp(0, 1).to(device)


def model_block(spec: SizeSpec, path: PathSettings, *, chains: Chains, autoddpm: bool = False,
                tau: float = 0.13) -> dict[str, Any]:
    """The size's YAML ``model`` block with the path's knobs and the benchmark's chains (a new dict).

    AnoDDPM's chain is the full DDPM chain from ``chains.anoddpm_level``; AutoDDPM (the same block, class
    ``model_zoo.autoddpm.AutoDDPM``) uses ``chains.autoddpm_levels`` and mask threshold ``tau`` (reference 0.13;
    < 0: per-image 95th percentile).
    """
    block = copy.deepcopy(spec.load()["model"])
    params = dict(block.get("params") or {})
    network = {**(params.get("network") or {}), "use_flash_attention": path.flash_attention}
    params.update(network=network, autocast_dtype=path.autocast_dtype, channels_last=path.channels_last,
                  torch_compile=path.torch_compile, compile_mode=path.compile_mode)
    if autoddpm:
        reconstruction, repaint = chains.autoddpm
        block.update(module_name="model_zoo.autoddpm", class_name="AutoDDPM")
        params.update(inference=asdict(reconstruction), val_inference=asdict(reconstruction), repaint=asdict(repaint),
                      tau=tau)
    else:
        params.update(inference=asdict(chains.anoddpm), val_inference=asdict(chains.anoddpm))
    block["params"] = params
    return block


def build_model(spec: SizeSpec, path: PathSettings, *, chains: Chains, autoddpm: bool = False,
                state_dict: dict[str, Tensor] | None = None, seed: int = 0, tau: float = 0.13) -> DDPM:
    """The size's DDPM (or AutoDDPM) built from its YAML by the strict builder, with the path's knobs
    (:func:`model_block`); ``state_dict`` loads shared weights strictly. Zero-initialised output layers are
    re-initialised (seeded), so that maps and parity compare real outputs, not zeros."""
    from core.Configurator import build

    block = model_block(spec, path, chains=chains, autoddpm=autoddpm, tau=tau)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(block, "model", base=AutoDDPM if autoddpm else DDPM)
        randomize_zero_layers(model, seed=seed)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ measurements
def interleaved_times(fns: Mapping[str, Callable[[], Any]], *, device: torch.device, warmup: int,
                      repeats: int) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Time several alternatives in turn (A, B, A, B, ...), so that load drifts on a shared machine hit all alike.

    Each alternative first runs ``max(warmup, 1)`` untimed calls in its own peak-memory window (CUDA), then the
    timed repeats alternate.

    Returns:
        (seconds per call for each name, peak memory of each name's warm-up window).
    """
    peaks = {}
    for name, fn in fns.items():
        reset_peak_memory(device)
        time_call(fn, device=device, warmup=max(warmup, 1), repeats=0)
        peaks[name] = peak_memory(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += time_call(fn, device=device, warmup=0, repeats=1)
    return times, peaks


def make_trainer(*, spec: SizeSpec, path: PathSettings, device: torch.device, run_dir: Path,
                 seed: int = 0) -> tuple[Trainer, Batch]:
    """The size's YAML trainer (its optimizer, EMA, clipping: ``trainer.params`` as a run builds them) on its DDPM,
    with the path's ``amp`` and fused Adam, and a batch. Step-only: no data, no logger (the benchmark times
    ``training_step``, the step :meth:`~core.Trainer.Trainer.fit` runs per batch, so that the two paths' steps can be
    interleaved)."""
    from core.Trainer import Trainer
    from dl_utils.run import Run

    model = build_model(spec, path, chains=REFERENCE_CHAINS, seed=seed)
    params = copy.deepcopy(spec.load()["trainer"].get("params") or {})
    optimizer = dict(params.pop("optimizer", None) or {"module_name": "torch.optim", "class_name": "Adam",
                                                        "params": {"lr": 1e-4}})
    optimizer["params"] = {**(optimizer.get("params") or {}), "fused": path.fused_adam}
    params.update(optimizer=optimizer, amp=path.trainer_amp, progress=False)
    run = Run(run_dir=run_dir, device=device, seed=seed)
    trainer = Trainer.from_options(model=model, run=run, **params)
    trainer.model.train()
    return trainer, Batch(image=_images(spec.train_batch, spec.image, device, seed))


def _optimizer_label(spec: SizeSpec) -> str:
    block = (spec.load()["trainer"].get("params") or {}).get("optimizer") or {}
    return f"{block.get('class_name', 'Adam')} {block.get('params') or {}}"


def training_throughput(*, spec: SizeSpec, paths: Mapping[str, PathSettings], device: torch.device, steps: int,
                        warmup: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Training images/s of the DDPM through ``core.Trainer.Trainer.training_step`` (forward via
    ``training_losses``, backward, Adam step) for each path, the paths' steps interleaved; median over ``steps``."""
    with tempfile.TemporaryDirectory(prefix="benchmark_") as tmp:
        trainers = {name: make_trainer(spec=spec, path=path, device=device, run_dir=Path(tmp) / name, seed=seed)
                    for name, path in paths.items()}
        torch.manual_seed(seed)
        fns = {name: (lambda t=trainer, b=batch: t.training_step(b)) for name, (trainer, batch) in trainers.items()}
        times, peaks = interleaved_times(fns, device=device, warmup=warmup, repeats=steps)
    out = {}
    for name, values in times.items():
        step_s = _median(values)
        out[name] = {"images_per_s": round(spec.train_batch / step_s, 3), "step_s_median": round(step_s, 5),
                     "step_s_all": [round(t, 5) for t in values], "batch_size": spec.train_batch, **peaks[name]}
    return out


def inference_timing(*, models: Mapping[str, DDPM], batch_size: int, size: int, device: torch.device, repeats: int,
                     calls: int, reference_calls: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Seconds per image of each model's ``get_anomaly`` at ``batch_size`` (median over ``repeats`` whole calls,
    the models' calls interleaved; same input and generator seed for all).

    Warm-up: three network calls at the same shape (kernel selection, compilation) instead of a whole chain.
    """
    x = _images(batch_size, size, device, seed)
    t = torch.full((batch_size,), 1, device=device, dtype=torch.long)
    generator = torch.Generator(device=device)

    def warm(model: DDPM) -> None:
        with torch.no_grad():
            for _ in range(3):
                model.eps(x, t)
        if isinstance(model, AutoDDPM):
            model.perceptual.to(device).spatial(x, x)

    def run(model: DDPM) -> None:
        generator.manual_seed(seed)
        model.get_anomaly(x, generator=generator)

    peaks = {}
    for name, model in models.items():
        reset_peak_memory(device)
        warm(model)
        peaks[name] = peak_memory(device)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            times[name] += time_call(lambda m=model: run(m), device=device, warmup=0, repeats=1)
    out = {}
    for name, values in times.items():
        per_image = _median(values) / batch_size
        entry = {"batch_size": batch_size, "s_per_image": round(per_image, 5), "network_evals": calls,
                 "call_s_all": [round(v, 4) for v in values], **peaks[name]}
        if device.type == "cuda":
            entry["peak_memory_note"] = "warm-up window (3 network calls); the chain itself holds no more activations"
        if calls != reference_calls:
            entry["s_per_image_reference_chain_est"] = round(per_image * reference_calls / calls, 4)
            entry["reference_network_evals"] = reference_calls
        out[name] = entry
    return out


def parity_check(plain_map: Tensor, fast_map: Tensor, *, precision: str) -> dict[str, Any]:
    """Agreement of two maps against :data:`PARITY_TOLERANCE` for ``precision``.

    Args:
        plain_map, fast_map: [B,1,H,W] maps of the plain and the fast path (same weights, same generator seed).
        precision: ``'float32'`` or ``'bfloat16'``, the fast path's network precision.

    Returns:
        ``max_abs``, ``mean_abs``, ``pearson`` (1 for identical constant maps), ``map_mean`` (plain),
        ``tolerance`` and ``passed``.
    """
    a, b = plain_map.detach().double().flatten().cpu(), fast_map.detach().double().flatten().cpu()
    diff = (a - b).abs()
    if a.std() > 0 and b.std() > 0:
        pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    else:
        pearson = 1.0 if torch.equal(a, b) else 0.0
    tol = PARITY_TOLERANCE[precision]
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    passed = max_abs <= tol["max_abs"] and mean_abs <= tol["mean_abs"] and pearson >= tol["min_pearson"]
    return {"precision": precision, "max_abs": max_abs, "mean_abs": mean_abs, "pearson": pearson,
            "map_mean": float(a.mean()), "tolerance": dict(tol), "passed": bool(passed)}


def anomaly_parity(*, spec: SizeSpec, fast: PathSettings, device: torch.device, chains: Chains, n_images: int = 4,
                   seed: int = 0, perceptual: Any = None) -> dict[str, Any]:
    """Fast vs plain AnoDDPM and AutoDDPM outputs with the same weights and the same generator seed.

    The anomaly maps and the reconstructions are compared (:func:`parity_check`). AutoDDPM runs with the adaptive
    mask threshold (tau < 0: per-image 95th percentile of c) so that its mask is never empty: with the fixed
    tau = 0.13 an untrained network's mask (and hence map) can be all zero, which would make the check vacuous.

    Args:
        perceptual: AutoDDPM's perceptual network (shared by both paths); None builds the default one.

    Returns:
        ``{'anoddpm': {'map': ..., 'reconstruction': ...}, 'autoddpm': {...}, 'passed': bool}``.
    """
    plain = path_settings("plain", device)
    x = _images(n_images, spec.image, device, seed + 1)
    out: dict[str, Any] = {}
    for method, auto in (("anoddpm", False), ("autoddpm", True)):
        reference = build_model(spec, plain, chains=chains, autoddpm=auto, seed=seed, tau=-1.0).to(device)
        other = build_model(spec, fast, chains=chains, autoddpm=auto, state_dict=reference.state_dict(),
                            seed=seed + 100, tau=-1.0).to(device)
        outputs = []
        for model in (reference, other):
            if auto and perceptual is not None:
                model.set_perceptual(perceptual)
            generator = torch.Generator(device=device).manual_seed(seed)
            outputs.append(model.get_anomaly(x, generator=generator))
        precision = fast.precision(device)
        checks = {"map": parity_check(outputs[0].anomaly_map, outputs[1].anomaly_map, precision=precision),
                  "reconstruction": parity_check(outputs[0].reconstruction, outputs[1].reconstruction,
                                                 precision=precision)}
        out[method] = {**checks, "passed": all(c["passed"] for c in checks.values())}
    out["passed"] = all(out[m]["passed"] for m in ("anoddpm", "autoddpm"))
    return out


def lpips_throughput(*, size: int, batch_size: int, device: torch.device, repeats: int,
                     backend: str = "auto", module: Any = None) -> dict[str, Any]:
    """Spatial LPIPS (SqueezeNet, AutoDDPM's) image pairs per second at ``batch_size``."""
    from optim.losses.perceptual import PerceptualDistance

    net = module if module is not None else PerceptualDistance(net="squeeze", backend=backend)
    net = net.to(device)
    x, y = _images(batch_size, size, device, 1), _images(batch_size, size, device, 2)
    reset_peak_memory(device)
    with torch.no_grad():
        times = time_call(lambda: net.spatial(x, y), device=device, warmup=1, repeats=repeats)
    return {"images_per_s": round(batch_size / _median(times), 2), "batch_size": batch_size, "image": size,
            "backend": net.backend_name, **peak_memory(device)}


def fid_feature_throughput(*, size: int, batch_size: int, device: torch.device, repeats: int,
                           backend: str = "auto") -> dict[str, Any]:
    """InceptionV3 (FID) feature images per second at ``batch_size`` (inputs resized to 299 inside)."""
    from optim.inception import InceptionFeatures

    net = InceptionFeatures(backend=backend, device=device)  # type: ignore[arg-type]
    x = _images(batch_size, size, device, 3)
    reset_peak_memory(device)
    times = time_call(lambda: net(x), device=device, warmup=1, repeats=repeats)
    return {"images_per_s": round(batch_size / _median(times), 2), "batch_size": batch_size, "image": size,
            "backend": net.backend_name, "weights": net.provenance.get("fid_weights"), **peak_memory(device)}


def loader_entry(*, n: int, size: int, batch_size: int) -> dict[str, Any]:
    """``tools.loader_benchmark.loader_throughput`` (first decoding epoch and cached epoch)."""
    from tools.loader_benchmark import loader_throughput

    result = loader_throughput(n=n, size=size, batch_size=batch_size)
    return {"available": True, "images_per_s": result["cached_epoch_images_per_s"], **result}


# ------------------------------------------------------------------------------------------------ the benchmark
@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run.

    Attributes:
        device: ``'cuda'`` or ``'cpu'``.
        size: a key of :data:`SIZES`.
        chains: chain lengths of the timed inference (shorter than the reference: extrapolated entries).
        train_steps, train_warmup: timed and warm-up training steps per path.
        infer_repeats: timed ``get_anomaly`` calls per batch size and path.
        feature_images, feature_repeats: batch size and repeats of the LPIPS / FID throughput.
        loader_images: files for the loader throughput (0: skip).
        parity_images: images of the parity check.
        compile_fast: ``torch.compile`` in the fast path.
        channels_last: ``'auto'`` (CUDA only), ``'on'`` or ``'off'`` for the fast path.
        perceptual_backend, fid_backend: ``PerceptualDistance`` / ``InceptionFeatures`` backends.
        methods: which inference methods to time (``'anoddpm'``, ``'autoddpm'``).
        smoke: the configuration is the smoke run.
        seed: weights, images and noise.
    """

    device: str = "cuda"
    size: SizeName = "reference"
    chains: Chains = REFERENCE_CHAINS
    train_steps: int = 10
    train_warmup: int = 3
    infer_repeats: int = 3
    feature_images: int = 32
    feature_repeats: int = 5
    loader_images: int = 2000
    parity_images: int = 4
    compile_fast: bool = False
    compile_mode: CompileMode = "default"
    channels_last: Literal["auto", "on", "off"] = "auto"
    perceptual_backend: str = "auto"
    fid_backend: str = "auto"
    methods: tuple[str, ...] = ("anoddpm", "autoddpm")
    smoke: bool = False
    seed: int = 0


def smoke_config(device: str = "cpu", **overrides: Any) -> BenchmarkConfig:
    """The tiny configuration CI runs (32x32, small UNet, a few steps and images; well under a minute on a CPU)."""
    base = BenchmarkConfig(device=device, size="tiny", chains=SMOKE_CHAINS, train_steps=2, train_warmup=1,
                           infer_repeats=1, feature_images=4, feature_repeats=1, loader_images=32,
                           parity_images=2, smoke=True)
    return replace(base, **overrides)


def _with_common(entry: dict[str, Any], info: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    return {**info, "settings": settings, **entry}


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Run every measurement of ``config`` and return the JSON-able result (see the module docstring)."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch.cuda.is_available() is False on this machine")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the plain path is true fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    spec = SIZES[config.size]
    info = device_info(device)
    paths = {name: path_settings(name, device, compile_fast=config.compile_fast, compile_mode=config.compile_mode,
                                 channels_last=config.channels_last) for name in ("plain", "fast")}
    started = time.perf_counter()
    result: dict[str, Any] = {
        "meta": {**info, "monai": _version("monai"), "python": platform.python_version(),
                 "timestamp": datetime.now(UTC).isoformat(timespec="seconds"), "size": config.size,
                 "size_spec": spec.describe(), "smoke": config.smoke, "config": _jsonable(asdict(config)),
                 "paths": {name: asdict(p) for name, p in paths.items()},
                 "fast_precision": paths["fast"].precision(device)},
    }
    logger.info("benchmark on %s, size %s, smoke=%s", info["device_name"], config.size, config.smoke)

    # --- training (the two paths' steps interleaved)
    steps = training_throughput(spec=spec, paths=paths, device=device, steps=config.train_steps,
                                warmup=config.train_warmup, seed=config.seed)
    training: dict[str, Any] = {}
    for name, path in paths.items():
        settings = {**asdict(path), "image": spec.image, "size": spec.describe(), "optimizer": _optimizer_label(spec),
                    "precision": path.precision(device)}
        training[name] = _with_common(steps[name], info, settings)
        logger.info("training %s: %.2f images/s", name, steps[name]["images_per_s"])
    training["speedup_fast_over_plain"] = round(training["fast"]["images_per_s"] / training["plain"]["images_per_s"], 3)
    result["training"] = training

    # --- inference (AnoDDPM, AutoDDPM) at each batch size, plain vs fast, same weights, calls interleaved
    perceptual = _perceptual(config.perceptual_backend)
    shared = build_model(spec, paths["plain"], chains=config.chains, seed=config.seed).state_dict()
    for method in config.methods:
        auto = method == "autoddpm"
        calls = config.chains.autoddpm_calls if auto else config.chains.anoddpm_calls
        reference_calls = REFERENCE_CHAINS.autoddpm_calls if auto else REFERENCE_CHAINS.anoddpm_calls
        chain = ({"inference": asdict(config.chains.autoddpm[0]), "repaint": asdict(config.chains.autoddpm[1])}
                 if auto else {"inference": asdict(config.chains.anoddpm)})
        models = {name: build_model(spec, path, chains=config.chains, autoddpm=auto, state_dict=shared).to(device)
                  for name, path in paths.items()}
        for model in models.values():
            if auto:
                model.set_perceptual(perceptual)
        block: dict[str, Any] = {}
        for batch_size in spec.infer_batches:
            entries = inference_timing(models=models, batch_size=batch_size, size=spec.image, device=device,
                                       repeats=config.infer_repeats, calls=calls, reference_calls=reference_calls,
                                       seed=config.seed)
            for name, entry in entries.items():
                settings = {**asdict(paths[name]), **chain, "image": spec.image,
                            "precision": paths[name].precision(device)}
                block[f"{name}_batch{batch_size}"] = _with_common(entry, info, settings)
                logger.info("%s %s batch %d: %.4f s/image", method, name, batch_size, entry["s_per_image"])
        del models
        block["speedup_fast_over_plain"] = {
            f"batch{b}": round(block[f"plain_batch{b}"]["s_per_image"] / block[f"fast_batch{b}"]["s_per_image"], 3)
            for b in spec.infer_batches}
        result[method] = block

    # --- parity
    parity = anomaly_parity(spec=spec, fast=paths["fast"], device=device, chains=config.chains,
                            n_images=config.parity_images, seed=config.seed, perceptual=perceptual)
    result["parity"] = _with_common(parity, info, {"fast": asdict(paths["fast"]), "plain": asdict(paths["plain"]),
                                                   "chains": asdict(config.chains), "image": spec.image,
                                                   "n_images": config.parity_images})

    # --- features and data
    result["lpips"] = _with_common(
        lpips_throughput(size=spec.image, batch_size=config.feature_images, device=device,
                         repeats=config.feature_repeats, module=perceptual),
        info, {"net": "squeeze", "spatial": True})
    result["fid_features"] = _with_common(
        fid_feature_throughput(size=spec.image, batch_size=config.feature_images, device=device,
                               repeats=config.feature_repeats, backend=config.fid_backend),
        info, {"resize": 299, "backend_requested": config.fid_backend})
    if config.loader_images > 0:
        result["loader"] = _with_common(
            loader_entry(n=config.loader_images, size=spec.image, batch_size=spec.train_batch), info,
            {"format": "png", "cache": "memory", "num_workers": 0})
    result["peak_memory"] = {**info, **peak_memory(device)}
    result["meta"]["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def _perceptual(backend: str) -> Any:
    from optim.losses.perceptual import PerceptualDistance

    return PerceptualDistance(net="squeeze", backend=backend)  # type: ignore[arg-type]


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(measurement, plain, fast, fast/plain) rows for the CLI table."""
    rows = [("training images/s", str(result["training"]["plain"]["images_per_s"]),
             str(result["training"]["fast"]["images_per_s"]), str(result["training"]["speedup_fast_over_plain"]))]
    for method in ("anoddpm", "autoddpm"):
        block = result.get(method)
        if block is None:
            continue
        for key, ratio in block["speedup_fast_over_plain"].items():
            rows.append((f"{method} s/image {key}", str(block[f"plain_{key}"]["s_per_image"]),
                         str(block[f"fast_{key}"]["s_per_image"]), f"{ratio} (speed-up)"))
    return rows


def _parse_levels(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected L_r,L_i,U (three integers), got {text!r}")
    return parts[0], parts[1], parts[2]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the benchmark, print a table and the JSON, write ``--out``."""
    parser = argparse.ArgumentParser(description="DDPM / AnoDDPM / AutoDDPM performance benchmark (fast vs plain).")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few steps (CI; < 1 min on a CPU)")
    parser.add_argument("--size", choices=tuple(SIZES), default=None, help="default: reference (tiny with --smoke)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet in the fast path")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune"), default="default",
                        help="torch.compile mode with --compile ('reduce-overhead': CUDA graphs, for batch 1)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--anoddpm-steps", type=int, default=None, help="AnoDDPM L (default 250; smoke 4)")
    parser.add_argument("--autoddpm-steps", type=_parse_levels, default=None,
                        help="AutoDDPM L_r,L_i,U (default 200,50,5; smoke 3,2,2)")
    parser.add_argument("--train-steps", type=int, default=None)
    parser.add_argument("--infer-repeats", type=int, default=None)
    parser.add_argument("--loader-images", type=int, default=None)
    parser.add_argument("--fid-backend", default="auto")
    parser.add_argument("--perceptual-backend", default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 with --smoke, robust on a shared CPU)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads if args.threads is not None else (1 if args.smoke else None)
    if threads is not None:
        # On a CPU shared with other jobs, one thread avoids OpenMP oversubscription (measured 5-30x faster here).
        torch.set_num_threads(threads)

    config = smoke_config(args.device) if args.smoke else BenchmarkConfig(device=args.device)
    chains = config.chains
    if args.anoddpm_steps is not None:
        chains = replace(chains, anoddpm_level=args.anoddpm_steps)
    if args.autoddpm_steps is not None:
        chains = replace(chains, autoddpm_levels=args.autoddpm_steps)
    overrides: dict[str, Any] = {"chains": chains, "compile_fast": args.compile, "compile_mode": args.compile_mode,
                                 "channels_last": args.channels_last,
                                 "fid_backend": args.fid_backend, "perceptual_backend": args.perceptual_backend}
    if args.size is not None:
        overrides["size"] = args.size
    for key in ("train_steps", "infer_repeats", "loader_images"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    result = run_benchmark(replace(config, **overrides))

    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\n{result['meta']['device_name']}, torch {result['meta']['torch']}, size {result['meta']['size']}")
    print(f"{'measurement':<32} {'plain':>12} {'fast':>12}  fast/plain")
    for name, plain, fast, ratio in summary_rows(result):
        print(f"{name:<32} {plain:>12} {fast:>12}  {ratio}")
    print(f"parity passed: {result['parity']['passed']}  (see 'parity' for max/mean abs difference and tolerance)")
    return 0 if result["parity"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
