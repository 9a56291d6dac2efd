"""The interfaces the evaluation package needs from the data and from whoever records results.

A :class:`core.data_module.DataModule` is a :class:`DataSource`; a :class:`dl_utils.experiment_logger.ExperimentLogger`
is a :class:`MetricSink`. Tests and command-line tools may pass any object with these methods.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from core.data_module import DatasetInfo
from data.batch import Batch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TableRow = Mapping[str, float | int | str]


class DataSource(Protocol):
    """Where evaluation reads images: named, never-augmented, never-shuffled loaders of :class:`Batch`."""

    @property
    def test_set_names(self) -> list[str]:
        """The test-set names in config order ('train' and 'val' are always valid names as well)."""
        ...

    def eval_dataloader(self, name: str) -> Iterable[Batch]:
        """Batches of ``'train'``, ``'val'`` or a test set, in a fixed order, without augmentation."""
        ...

    def dataset_info(self, name: str) -> DatasetInfo:
        """What a task needs to know about a set (pathological, has masks, annotation kind, size)."""
        ...


class MetricSink(Protocol):
    """Where the runner sends a task's results (the experiment logger of a run, ``run.logger``; provenance goes to
    the run's manifest, :meth:`dl_utils.run.Run.update_manifest`)."""

    def log_eval(self, task: str, dataset: str, metrics: Mapping[str, float]) -> None: ...

    def log_figure(self, key: str, figure: Figure, *, step: int | None = None) -> object: ...

    def log_table(self, key: str, rows: list[TableRow]) -> object: ...

    def update_config(self, **entries: object) -> None: ...
