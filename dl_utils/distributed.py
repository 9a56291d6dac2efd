"""Process-group setup for ``torchrun`` launches (NCCL on GPUs, gloo on CPUs) and small helpers.

Launch with ``torchrun --nproc_per_node=N core/Main.py --config_path X.yaml``; torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without them the process is a
single-process run (rank 0 of 1) and no process group is created.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "gpu", "cpu"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job and the device it should use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from err


def init_distributed(device: DeviceChoice = "auto", *, timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's environment, pick the device and, for more than one process, join the process group.

    Args:
        device: ``'gpu'`` requires CUDA (error otherwise), ``'cpu'`` forces the CPU, ``'auto'`` takes CUDA
            when available. With CUDA each process uses ``cuda:LOCAL_RANK`` and NCCL; on CPU, gloo.
        timeout_s: collective timeout (a rank waiting longer than this for the others fails).

    Returns:
        ``DistInfo(rank, world_size, local_rank, device)``; ``(0, 1, 0, device)`` outside torchrun.

    Raises:
        ValueError: for an unknown ``device``.
        RuntimeError: ``'gpu'`` without CUDA, a malformed torchrun environment, or too few GPUs.
    """
    choices = get_args(DeviceChoice)
    if device not in choices:
        raise ValueError(f"device {device!r} is not one of {', '.join(repr(c) for c in choices)}")
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device 'gpu' was asked for but CUDA is not available (no GPU or a CPU-only torch)")
    use_cuda = device == "gpu" or (device == "auto" and torch.cuda.is_available())
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size < 1:
        raise RuntimeError(f"WORLD_SIZE must be >= 1, got {world_size}")
    rank = _env_int("RANK", 0 if world_size == 1 else None)
    local_rank = _env_int("LOCAL_RANK", 0 if world_size == 1 else None)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                               "are visible")
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch_device if use_cuda else None)
        logger.info("joined process group: rank %d/%d (local %d), backend %s, device %s",
                    rank, world_size, local_rank, backend, torch_device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
