"""Faults the reliability suite injects: a model whose loss turns NaN, a disk that fills up, a slow config load.

``python -m tests.reliability._faults --enospc history.jsonl -- <core/Main.py arguments>`` runs
``core.Main.main`` with every ``Path.open``/``Path.write_text`` of a file of that name failing with
``OSError(ENOSPC)``, as a full disk makes it fail (a full disk cannot be made without root on a shared
machine). ``--slow-loading MARKER`` makes the config load write ``MARKER`` and then wait two minutes, so a
signal can be sent while the config is being loaded (before any run folder exists).
"""

from __future__ import annotations

import argparse
import errno
import os
import pathlib
import sys
import time

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
    parser.add_argument("main_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.enospc:
        _fail_on(args.enospc)
    if args.slow_loading:
        _slow_loading(args.slow_loading)
    from core.Main import main as run_main

    return run_main([a for a in args.main_args if a != "--"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
