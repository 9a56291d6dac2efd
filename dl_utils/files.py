"""Atomic file writes: a reader, a crash or an interruption never leaves half a file.

Every file the framework rewrites in place (checkpoints, ``manifest.json``, ``metrics.json``, the history, the
study's ``runs.json``, cached features) goes through :func:`write_atomic`: the content is written to a
temporary file in the same folder, optionally fsynced, then renamed over the destination. A SIGINT/SIGTERM
arriving meanwhile is held until the rename is done (:func:`dl_utils.interrupts.deferred_interrupts`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from dl_utils.interrupts import deferred_interrupts


def write_atomic(path: str | Path, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: destination; its folder must exist.
        write: writes the whole content to the path it is given (it must not append a suffix to it).
        fsync: flush the content to disk before the rename (for files a crash must not lose: checkpoints).

    Returns:
        ``path``. On any failure the temporary file is removed and the previous ``path`` is untouched.
    """
    path = Path(path)
    with deferred_interrupts():
        # named per process and thread (not mkstemp: its 0600 mode would outlive the rename)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            write(tmp)
            if fsync:
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, *, fsync: bool = False) -> Path:
    """:func:`write_atomic` for UTF-8 text."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fsync=fsync)
