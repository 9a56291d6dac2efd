"""The task registry: task functions, what they produce and require, and their options checked at build time.

A task is a function ``fn(ctx: EvalContext, *, <options>, <artifacts>) -> TaskResult`` added with
:func:`register_task`. Its keyword parameters are of two kinds:

- options, set from YAML ``params``: checked against their annotations when the config is built. Two
  ``Annotated`` markers add checks: :data:`DatasetName` / :data:`DatasetNames` (must be ``'train'``, ``'val'``
  or a test set of the data module) and :class:`Between` (numbers, or every number of a list, in an open
  interval), e.g. :data:`Fpr` / :data:`Fprs`;
- artifacts, annotated with a type in :data:`ARTIFACT_TYPES` (``thresholds: Thresholds | None``): handed over by
  the runner from the task that declares it ``provides`` that type, never set from YAML.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from core.Configurator import type_problem
from core.evaluation.per_image import PerImage
from core.evaluation.protocols import TableRow
from core.evaluation.thresholds import MaskCalibration, ScoreCalibration, Thresholds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ARTIFACT_TYPES: tuple[type, ...] = (Thresholds, MaskCalibration, ScoreCalibration)
RESERVED_DATASETS = ("train", "val")


@dataclass(frozen=True)
class DatasetRef:
    """Marker: the option names datasets ('train', 'val' or a test set); None means 'every test set'."""


@dataclass(frozen=True)
class Between:
    """Marker: the number (or each number of a list) lies in the open interval (low, high)."""

    low: float
    high: float

    def problem(self, value: object) -> str | None:
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, int | float) and not self.low < v < self.high:
                return f"{v!r} is not in ({self.low:g}, {self.high:g})"
        return None


DATASET = DatasetRef()
DatasetName = Annotated[str, DATASET]
OptionalDatasetName = Annotated[str | None, DATASET]
DatasetNames = Annotated[Sequence[str] | None, DATASET]
Fpr = Annotated[float, Between(0.0, 1.0)]
Fprs = Annotated[Sequence[float], Between(0.0, 1.0)]


@dataclass
class TaskResult:
    """What a task returns: metrics per dataset (floats), figures, tables, provenance, report notes, artifacts, and
    per-image numbers per dataset (:mod:`core.evaluation.per_image`, written to the run's ``per_image/``)."""

    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, list[TableRow]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    artifacts: tuple[Thresholds | MaskCalibration | ScoreCalibration, ...] = ()
    per_image: dict[str, PerImage] = field(default_factory=dict)


TaskFunction = Callable[..., TaskResult]


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its function, YAML options, required artifacts (parameter -> type) and products."""

    name: str
    fn: TaskFunction
    options: dict[str, inspect.Parameter]
    hints: dict[str, Any]
    requires: dict[str, type]
    provides: tuple[type, ...]

    def check_options(self, options: Mapping[str, object]) -> None:
        """Names, types and value ranges of YAML options.

        Raises:
            ValueError: ``params.<key>: ...`` naming the valid options or the accepted values.
        """
        for key, value in options.items():
            if key not in self.options:
                raise ValueError(f"params.{key}: unknown option for task {self.name!r}; valid options: "
                                 f"{', '.join(self.options)}")
            annotation, markers = _split(self.hints.get(key, Any))
            problem = type_problem(value, annotation)
            for marker in markers:
                if problem is None and isinstance(marker, Between):
                    problem = marker.problem(value)
            if problem:
                raise ValueError(f"params.{key}: {problem}")

    def check_datasets(self, options: Mapping[str, object], valid: Sequence[str]) -> None:
        """Every dataset name an option refers to (given or default) must be in ``valid``.

        Raises:
            ValueError: ``params.<key>: ...`` listing the valid names.
        """
        for key, parameter in self.options.items():
            if DATASET not in _split(self.hints.get(key, Any))[1]:
                continue
            value = options.get(key, parameter.default)
            names = [] if value is None else [value] if isinstance(value, str) else list(value)
            for name in names:
                if name not in valid:
                    raise ValueError(f"params.{key}: {name!r} is not a dataset of the data module; valid names: "
                                     f"{', '.join(valid)}")


def _split(annotation: Any) -> tuple[Any, tuple[object, ...]]:
    """``Annotated[T, m1, m2]`` -> (T, (m1, m2)); anything else -> (annotation, ())."""
    if typing.get_origin(annotation) is Annotated:
        base, *markers = typing.get_args(annotation)
        return base, tuple(markers)
    return annotation, ()


def _artifact_type(annotation: Any) -> type | None:
    """The artifact type of ``T`` or ``T | None`` when T is in :data:`ARTIFACT_TYPES`."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((t for t in candidates if t in ARTIFACT_TYPES), None)


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, *, provides: tuple[type, ...] = ()) -> Callable[[TaskFunction], TaskFunction]:
    """Decorator adding ``fn(ctx, **options) -> TaskResult`` to :data:`TASKS`.

    Args:
        name: the ``task`` value YAML uses.
        provides: artifact types (from :data:`ARTIFACT_TYPES`) the task returns in ``TaskResult.artifacts``;
            the runner runs it before the tasks that declare a parameter of such a type.
    """
    def add(fn: TaskFunction) -> TaskFunction:
        if name in TASKS:
            raise ValueError(f"evaluation task {name!r} is registered twice")
        for t in provides:
            if t not in ARTIFACT_TYPES:
                raise ValueError(f"task {name!r}: provides {t.__name__}, which is not an artifact type")
        hints = typing.get_type_hints(fn, include_extras=True)
        params = [p for p in inspect.signature(fn).parameters.values() if p.name != "ctx"]
        requires = {p.name: t for p in params if (t := _artifact_type(hints.get(p.name))) is not None}
        options = {p.name: p for p in params if p.name not in requires}
        TASKS[name] = TaskSpec(name=name, fn=fn, options=options, hints=hints, requires=requires,
                               provides=tuple(provides))
        return fn

    return add
