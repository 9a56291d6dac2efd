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
