"""SIGINT/SIGTERM as :class:`~dl_utils.errors.RunInterrupted`, held back while a file is being written.

``core/Main.py`` wraps a command in :func:`interrupts_raise`: the signals then raise ``RunInterrupted`` in the
main thread, so the run records its status (``interrupted``) on the way out. A signal raises wherever the main
thread happens to be, which inside ``torch.save`` is harmful: its zip writer, unwound half way, raises its own
``RuntimeError`` and hides the interruption (the command then ends as a crash with exit 1 instead of 143/130).
Every atomic file write therefore runs under :func:`deferred_interrupts`: a signal arriving inside it is held
and raised as soon as the write has finished, so the file is complete and the interruption is still reported.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

from dl_utils.errors import RunInterrupted

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_state = {"depth": 0, "pending": None}  # main thread only: signal handlers run there


def _handler(signum: int, _frame: Any) -> None:
    name = signal.Signals(signum).name
    if _state["depth"] > 0:
        if _state["pending"] is None:
            logger.warning("%s received while a file is being written; stopping once it is complete", name)
        _state["pending"] = name
        return
    raise RunInterrupted(name)


@contextlib.contextmanager
def interrupts_raise() -> Iterator[None]:
    """Inside the block SIGINT and SIGTERM raise :class:`RunInterrupted` (in the main thread; elsewhere a no-op).

    The previous handlers are restored on the way out.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back an interruption until the block has finished (blocks nest; the outermost one raises).

    Only signals routed through :func:`interrupts_raise` are held; without it (another thread, a plain Python
    program) this is a no-op. When the block fails while a signal is held, the failure is logged and the
    interruption raised (the failure is its ``__cause__``): the user asked to stop, and the run's status says so.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _state["depth"] += 1
    failure: BaseException | None = None
    try:
        yield
    except BaseException as err:
        failure = err
        raise
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"] is not None:
            name, _state["pending"] = _state["pending"], None
            if failure is not None and not isinstance(failure, RunInterrupted):
                logger.warning("while stopping for %s, the write failed: %s", name, failure)
            raise RunInterrupted(name) from failure
