"""What a trainer or evaluation task needs to know about the current run, and the run folder's lifecycle.

The manifest (``manifest.json``) carries the run's ``status``: ``running`` from the moment the folder holds
files, then ``finished``, ``failed`` (with ``error``, one line) or ``interrupted`` (SIGINT/SIGTERM). Every
transition and every resume is appended to its ``events`` list; the provenance written at the start is never
rewritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from dl_utils.errors import RunFolderError


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


def make_run_dir(output_dir: str | Path, experiment: str, name: str) -> Path:
    """A new ``<output_dir>/<experiment>/<name>/<timestamp>/`` (relative output_dir: against the working directory).

    Two runs started in the same second get distinct folders (``<timestamp>-1``, ...).

    Raises:
        RunFolderError: the folder cannot be created (naming ``experiment.output_dir`` and the path).
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = Path(output_dir) / experiment / name
    for attempt in range(100):
        run_dir = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)
            return run_dir
        except FileExistsError:
            continue
        except OSError as err:
            raise RunFolderError(f"cannot create the run folder under experiment.output_dir {str(output_dir)!r}: "
                                 f"{err.filename or parent}: {err.strerror or err}") from err
    raise RunFolderError(f"no free run folder for {stamp} under {parent}")


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


# ------------------------------------------------------------------------------------------------ run lifecycle
RunStatus = Literal["running", "finished", "failed", "interrupted"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
MANIFEST = "manifest.json"
HISTORY = "history.jsonl"
SUPERSEDED_HISTORY = "history.superseded.jsonl"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``manifest.json`` ({} when there is none)."""
    path = Path(run_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` atomically (a temporary file renamed over it: a crash never leaves half a file)."""
    path = Path(run_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def update_manifest(run_dir: str | Path, **entries: Any) -> dict[str, Any]:
    """Merge top-level entries into the manifest; returns the new manifest."""
    manifest = read_manifest(run_dir)
    manifest.update(entries)
    write_manifest(run_dir, manifest)
    return manifest


def add_event(run_dir: str | Path, event: str, **details: Any) -> None:
    """Append ``{"event", "time", **details}`` to the manifest's ``events`` list (never rewrites earlier ones)."""
    manifest = read_manifest(run_dir)
    manifest.setdefault("events", []).append({"event": event, "time": now(), **details})
    write_manifest(run_dir, manifest)


def set_status(run_dir: str | Path, status: RunStatus, *, error: str | None = None) -> None:
    """Record a lifecycle transition: ``status`` (and ``error`` for failed/interrupted runs) plus an event.

    Best effort: a manifest that cannot be written (disk full, folder gone) is logged, never raised, so the
    error that ended the run is the one reported.
    """
    if status not in RUN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(RUN_STATUSES)}")
    try:
        manifest = read_manifest(run_dir)
        manifest["status"] = status
        manifest["status_time"] = now()
        if error is None:
            manifest.pop("error", None)
        else:
            manifest["error"] = error
        manifest.setdefault("events", []).append(
            {"event": status, "time": manifest["status_time"], **({"error": error} if error else {})})
        write_manifest(run_dir, manifest)
    except (OSError, ValueError) as err:
        logging.getLogger(__name__).warning("could not record run status %r in %s: %s", status, run_dir, err)


def config_differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """``(yaml.path, old, new)`` for every leaf that differs between two plain configs (absent = ``<absent>``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in list(old) + [k for k in new if k not in old]:
            where = f"{path}.{key}" if path else str(key)
            out += config_differences(old.get(key, "<absent>"), new.get(key, "<absent>"), where)
        return out
    return [] if old == new else [(path, old, new)]


def rewind_history(run_dir: str | Path, step: int) -> int:
    """Prepare ``history.jsonl`` for a resume from a checkpoint at optimizer step ``step``.

    Rows after the last training/validation row with ``step <= step`` were logged by the interrupted run
    after its last checkpoint; the resumed run logs them again. They move (appended, with the resume step) to
    ``history.superseded.jsonl``, so no row is duplicated and none is lost.

    Returns:
        The number of rows moved.
    """
    path = Path(run_dir) / HISTORY
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = 0
    for index, line in enumerate(lines):
        row_step = json.loads(line).get("step")
        if row_step is not None and row_step <= step:
            keep = index + 1
    moved = lines[keep:]
    if moved:
        with (Path(run_dir) / SUPERSEDED_HISTORY).open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"superseded_by_resume_from_step": step, **json.loads(line)}) + "\n"
                         for line in moved)
        tmp = path.with_name(f".{HISTORY}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in lines[:keep]), encoding="utf-8")
        os.replace(tmp, path)
    return len(moved)
