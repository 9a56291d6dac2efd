"""Faults the reliability suite injects: a model whose loss turns NaN, a disk that fills up, a slow config load, an
interruption right after a checkpoint.

``python -m tests.reliability._faults --enospc history.jsonl -- <core/Main.py arguments>`` runs
``core.Main.main`` with every ``Path.open``/``Path.write_text`` of a file of that name failing with
``OSError(ENOSPC)``, as a full disk makes it fail (a full disk cannot be made without root on a shared
machine). ``--enospc-checkpoint latest.pt --after 1`` lets the first write of that checkpoint succeed and makes
the next one fail as a full disk fails ``torch.save``: part of the bytes reach the temporary file, then the write
raises ``OSError(ENOSPC)`` naming no file. ``--slow-loading MARKER`` makes the config load write ``MARKER`` and
then wait two minutes, so a signal can be sent while the config is being loaded (before any run folder exists).
``--interrupt-after-checkpoint latest.pt --after 1`` sends this process SIGINT (what Ctrl-C sends) right after
the first write of that checkpoint: an interrupted run with a checkpoint, without timing a signal from outside.
``--pause-after-checkpoint latest.pt`` sleeps five minutes after that write instead: a live run that costs no CPU
while a case resumes it, reports on it, or kills it.
"""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import signal
import sys
import time
from typing import Any

import torch
from torch import Tensor

from data.batch import Batch
from model_zoo.ae import AutoEncoder


class NaNAfterAE(AutoEncoder):
    """The autoencoder whose training loss becomes NaN from its ``nan_after + 1``-th training step on.

    Args:
        nan_after: number of finite training steps before the loss is NaN.
        **params: passed to :class:`model_zoo.ae.AutoEncoder`.
    """

    def __init__(self, *, nan_after: int = 0, channels: list[int] | None = None, latent_channels: int = 8) -> None:
        super().__init__(channels=channels or [4, 8], latent_channels=latent_channels)
        self.nan_after = nan_after
        self.calls = 0

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        terms = super().training_losses(batch)
        self.calls += 1
        if self.calls > self.nan_after:
            terms["recon"] = terms["recon"] * torch.tensor(float("nan"))
        return terms


def _fail_on(name: str) -> None:
    real_open, real_write = pathlib.Path.open, pathlib.Path.write_text

    def check(path: pathlib.Path) -> None:
        if path.name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def fake_open(self: pathlib.Path, mode: str = "r", *args: object, **kwargs: object):  # noqa: ANN202
        if any(c in mode for c in "wax+"):
            check(self)
        return real_open(self, mode, *args, **kwargs)

    def fake_write(self: pathlib.Path, *args: object, **kwargs: object) -> int:
        check(self)
        return real_write(self, *args, **kwargs)

    pathlib.Path.open = fake_open  # type: ignore[method-assign]
    pathlib.Path.write_text = fake_write  # type: ignore[method-assign]


def _after_writes(name: str, after: int, then: Any) -> None:
    """Wrap ``dl_utils.checkpoint.save_checkpoint``: once ``after`` checkpoints named ``name`` were written, the
    next call runs ``then(path, state, real_save)`` instead of a plain save."""
    import dl_utils.checkpoint as ckpt

    real_save = ckpt.save_checkpoint
    written = [0]

    def save(path: Any, state: Any) -> pathlib.Path:
        if pathlib.Path(path).name != name:
            return real_save(path, state)
        written[0] += 1
        return then(path, state, real_save) if written[0] > after else real_save(path, state)

    ckpt.save_checkpoint = save


def _disk_full_checkpoint(name: str, after: int) -> None:
    real_torch_save = torch.save

    def full_disk_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        handle.write(b"\x00" * 4096)  # what fitted on the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # torch's writer names no file

    def then(path: Any, state: Any, real_save: Any) -> pathlib.Path:
        torch.save = full_disk_save
        try:
            return real_save(path, state)
        finally:
            torch.save = real_torch_save

    _after_writes(name, after, then)


def _interrupt_after_checkpoint(name: str, after: int) -> None:
    def then(path: Any, state: Any, real_save: Any) -> pathlib.Path:
        written = real_save(path, state)
        os.kill(os.getpid(), signal.SIGINT)  # handled at the next bytecode: RunInterrupted from here
        return written

    _after_writes(name, after - 1, then)


def _pause_after_checkpoint(name: str, after: int) -> None:
    def then(path: Any, state: Any, real_save: Any) -> pathlib.Path:
        written = real_save(path, state)
        time.sleep(300)  # alive and idle: a signal ends the sleep (SIGTERM: RunInterrupted; SIGKILL: the process)
        return written

    _after_writes(name, after - 1, then)


def _slow_loading(marker: str) -> None:
    import core.Main

    real_load = core.Main.load_config

    def slow_load(*args: object, **kwargs: object) -> object:
        pathlib.Path(marker).write_text("loading\n")
        time.sleep(120)
        return real_load(*args, **kwargs)

    core.Main.load_config = slow_load


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--enospc", help="file name whose writes fail with ENOSPC")
    parser.add_argument("--slow-loading", metavar="MARKER", help="the config load writes MARKER, then waits")
    parser.add_argument("--enospc-checkpoint", metavar="NAME", help="writes of this checkpoint after --after fail")
    parser.add_argument("--interrupt-after-checkpoint", metavar="NAME", help="SIGINT after the --after-th write")
    parser.add_argument("--pause-after-checkpoint", metavar="NAME", help="sleep 300 s after the --after-th write")
    parser.add_argument("--after", type=int, default=1, help="checkpoint writes before the fault (default 1)")
    parser.add_argument("main_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.enospc:
        _fail_on(args.enospc)
    if args.enospc_checkpoint:
        _disk_full_checkpoint(args.enospc_checkpoint, args.after)
    if args.interrupt_after_checkpoint:
        _interrupt_after_checkpoint(args.interrupt_after_checkpoint, args.after)
    if args.pause_after_checkpoint:
        _pause_after_checkpoint(args.pause_after_checkpoint, args.after)
    if args.slow_loading:
        _slow_loading(args.slow_loading)
    from core.Main import main as run_main

    return run_main([a for a in args.main_args if a != "--"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
