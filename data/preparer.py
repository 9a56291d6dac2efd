"""Base class of ``data.params.prepare`` blocks: something that makes a dataset's files before use."""

from __future__ import annotations

import abc
from pathlib import Path


class DatasetPreparer(abc.ABC):
    """Builds (or finds) a prepared dataset folder; ``DataModule`` calls :meth:`prepare` on first use.

    Split paths in the data config that start with ``$prepared/`` are resolved against the returned folder,
    so a config for generated data has the same split section as one for real data.
    """

    @abc.abstractmethod
    def prepare(self) -> Path:
        """Make the files if they are missing and return the dataset's root folder (idempotent)."""
