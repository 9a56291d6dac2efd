"""The user-error hierarchy: failures caused by the user's inputs, reported in one line without a traceback.

``core/Main.py`` catches :class:`UserError` once, logs ``<kind> error: <message>`` (the message names the
culprit: file and CSV row, checkpoint path, training step, folder) and exits 1; the traceback is shown only
with ``--log_level DEBUG``. Configuration mistakes are :class:`core.Configurator.ConfigError` (exit 2).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's data, files or environment; the message names the culprit."""

    kind = "user"


class DataError(UserError):
    """A split CSV or an image/mask file is missing, empty, misaligned, unreadable or of the wrong size."""

    kind = "data"


class RunFolderError(UserError):
    """The run folder cannot be written (permission denied, read-only file system, disk full)."""

    kind = "output"


class NonFiniteLossError(UserError, FloatingPointError):
    """A training loss became NaN or infinite; the message names the step and the terms."""

    kind = "training"


class RunInterrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of the run
    """SIGINT or SIGTERM arrived; raised by the signal handler ``core/Main.py`` installs.

    A ``BaseException`` (like ``KeyboardInterrupt``) so no ``except Exception`` on the way swallows it.

    Attributes:
        signal_name: ``'SIGINT'`` or ``'SIGTERM'``.
        outcome: what the interrupted command left behind (the run folder and its state), set by the code that
            owns the run folder on the way out; None when no run folder had been created.
    """

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.outcome: str | None = None
