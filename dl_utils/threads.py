"""The CPU thread policy of a run: how many intra-op threads torch uses, and how OpenMP's idle threads wait.

On a CPU, torch splits every large operation over its intra-op threads (by default one per physical core) and the
threads meet at a barrier after each. When another process is runnable on one of those cores, the thread there
is descheduled and every other thread waits for it at the next barrier; with OpenMP's default wait policy the
waiting threads spin, taking CPU time from the very thread they wait for. On a 2-core machine with one busy
process beside it, a CPU run then slows down by an order of magnitude (docs/performance.md, "CPU threads").

Policies (``experiment.threads``, see :func:`apply_policy`):

* ``auto`` (default): :data:`AUTO_POLICY`, chosen by ``python -m tools.thread_benchmark`` (docs/performance.md);
  when the environment sets ``OMP_NUM_THREADS``, that count is kept (the user's or the launcher's choice).
* ``torch``: torch's own default count (one thread per physical core).
* ``free``: one thread per core that was idle when the run started (measured over :data:`FREE_SAMPLE_S` from
  ``/proc/stat``), at least one.
* a positive integer: exactly that many threads.

The wait policy is process-wide and read once, when torch loads OpenMP: :func:`prepare_environment` (called by
``core/Main.py`` before it imports torch) sets ``OMP_WAIT_POLICY`` to :data:`WAIT_POLICY` (when not None) unless
the environment already sets it. This module does not import torch at import time for that reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

AUTO_POLICY: str | int = "free"  # docs/performance.md, "CPU threads": why
WAIT_POLICY: str | None = None  # None: OpenMP's own default (spinning for a while, then sleeping)
FREE_SAMPLE_S = 0.25
POLICIES = ("auto", "torch", "free")


def prepare_environment() -> None:
    """Set ``OMP_WAIT_POLICY`` to :data:`WAIT_POLICY` (if any) unless it is set; call before torch is imported."""
    if WAIT_POLICY is not None:
        os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """``(idle + iowait, total)`` jiffies over all cores from ``/proc/stat``, or None without it."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])


def free_cores(sample_s: float = FREE_SAMPLE_S) -> int:
    """How many cores were idle over ``sample_s`` seconds (rounded, at least 1; all of them without ``/proc``)."""
    cores = available_cores()
    first = _cpu_times()
    if first is None:
        return cores
    time.sleep(sample_s)
    second = _cpu_times()
    if second is None or second[1] <= first[1]:
        return cores
    idle = (second[0] - first[0]) / (second[1] - first[1])  # fraction of the machine's CPU time left idle
    machine = os.cpu_count() or cores
    return max(1, min(cores, round(idle * machine)))


def check_setting(value: Any, where: str = "experiment.threads") -> str | int:
    """``value`` as a policy name or a thread count; ValueError (naming ``where``) for anything else."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{where}: expected one of {', '.join(POLICIES)} or a positive integer, got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"{where}: a thread count must be >= 1, got {value}")
    if isinstance(value, str) and value not in POLICIES:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(POLICIES)} (or a positive integer)")
    return value


def apply_policy(setting: str | int) -> dict[str, Any]:
    """Set torch's intra-op thread count for ``setting`` (see the module docstring); returns what was done, for
    the manifest: ``setting``, ``policy`` (the one applied), ``threads``, ``omp_wait_policy``, ``cores``, and
    ``free_cores`` for the ``free`` policy."""
    import torch

    check_setting(setting)
    policy: str | int = AUTO_POLICY if setting == "auto" else setting
    record: dict[str, Any] = {"setting": setting, "cores": available_cores(),
                              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if setting == "auto" and os.environ.get("OMP_NUM_THREADS"):
        policy = "environment"  # OMP_NUM_THREADS already set torch's count when it loaded
    elif isinstance(policy, int):
        torch.set_num_threads(policy)
    elif policy == "free":
        record["free_cores"] = free_cores()
        torch.set_num_threads(record["free_cores"])
    record.update(policy=policy, threads=torch.get_num_threads())
    return record
