"""What a trainer or evaluation task needs to know about the current run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class RunContext:
    """The run's folder, device, seed and resolved config, and this process's place in a distributed job.

    Attributes:
        run_dir: the run folder (``runs/<experiment>/<name>/<timestamp>/``); checkpoints go to ``run_dir/checkpoints``.
        device: where tensors live.
        seed: the experiment seed.
        config: the resolved config (read-only by convention; stored in checkpoints).
        rank, world_size: distributed position (0, 1 for a single process).
        resume_from: checkpoint to continue from (``experiment.resume``), or None.
    """

    run_dir: Path
    device: torch.device
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    resume_from: Path | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and logs."""
        return self.rank == 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST_PACKAGES = (
    "torch", "torchvision", "monai", "numpy", "scipy", "scikit-learn", "scikit-image", "pandas", "nibabel",
    "nilearn", "lpips", "stlpips-pytorch", "wandb", "PyYAML",
)


def make_run_dir(output_dir: str | Path, experiment: str, name: str, timestamp: str) -> Path:
    """``<output_dir>/<experiment>/<name>/<timestamp>/`` (relative output_dir: against the working directory)."""
    run_dir = Path(output_dir) / experiment / name / timestamp
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit SHA and whether the work tree has uncommitted changes (None when not a git checkout)."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions(names: tuple[str, ...] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def device_description(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        import platform

        info["name"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info
