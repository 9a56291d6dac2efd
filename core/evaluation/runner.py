"""Building the ``downstream_tasks`` blocks, ordering them by what they produce and require, and running them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from core.Configurator import ConfigError, build, is_enabled
from core.evaluation import tasks as _tasks  # noqa: F401  (importing the package registers every task)
from core.evaluation.context import EvalContext
from core.evaluation.per_image import write_per_image
from core.evaluation.protocols import DataSource, MetricSink
from core.evaluation.registry import RESERVED_DATASETS, TASKS, TaskResult, TaskSpec
from core.evaluation.report import write_report
from core.evaluation.thresholds import MaskCalibration, Thresholds
from dl_utils.run import Run
from model_zoo.base import AnomalyModel, TrainableModel
from model_zoo.registry import stage1_problem

logger = logging.getLogger(__name__)

Metrics = dict[str, dict[str, dict[str, float]]]
COST_BLOCK = "cost"  # eval/cost/<dataset>/{s_per_image,network_calls}, read by tools/study.py
# Artifacts every model output depends on (a calibrated mask threshold): the blocks providing them run first.
MODEL_INPUTS: tuple[type, ...] = (MaskCalibration,)


def require_scorer(model: TrainableModel, why: str) -> AnomalyModel:
    """``model`` if it scores anomalies (an :class:`~model_zoo.base.AnomalyModel`).

    Args:
        model: the built ``model`` block.
        why: what needs the scores and how to do without, e.g. ``"downstream_tasks must be empty for it (set
            downstream_tasks: null)"``.

    Raises:
        ConfigError: naming ``model.class_name``, why the class cannot score and what scores on its checkpoint.
    """
    if isinstance(model, AnomalyModel):
        return model
    raise ConfigError(f"model.class_name: {stage1_problem(type(model))}. {why}")


class DownstreamEvaluator:
    """One ``downstream_tasks.<name>`` block: a registered task and its options, validated at build time.

    Args:
        task: a registered task name (see :data:`core.evaluation.registry.TASKS`).
        **options: the task function's keyword options (unknown names, wrong types and out-of-range values
            are errors; dataset names are checked against a data module by :meth:`check_datasets`).
    """

    def __init__(self, *, task: str, **options: object) -> None:
        if task not in TASKS:
            raise ValueError(f"params.task: {task!r} is not a registered evaluation task; valid tasks: "
                             f"{', '.join(sorted(TASKS))}")
        self.spec: TaskSpec = TASKS[task]
        self.spec.check_options(options)
        self.task = task
        self.options = dict(options)

    def check_datasets(self, valid: Sequence[str]) -> None:
        """Raise ValueError (``params.<key>: ...``) if an option names a dataset outside ``valid``."""
        self.spec.check_datasets(self.options, valid)

    def __call__(self, ctx: EvalContext, **artifacts: Thresholds | None) -> TaskResult:
        return self.spec.fn(ctx, **self.options, **artifacts)

    def __repr__(self) -> str:
        return f"DownstreamEvaluator(task={self.task!r}, options={self.options!r})"


def build_downstream(tasks_cfg: Mapping[str, object] | None, *, data: DataSource | None = None
                     ) -> dict[str, DownstreamEvaluator]:
    """Build every enabled ``downstream_tasks`` block (``enabled: false`` ones are skipped).

    Args:
        tasks_cfg: the ``downstream_tasks`` section.
        data: the data module; when given, every dataset name a block refers to (including defaults) must be
            'train', 'val' or one of its test sets.

    Raises:
        ConfigError: naming the YAML path (``downstream_tasks.<name>.params.<key>``) and the valid choices.
    """
    if tasks_cfg is None:
        return {}
    if not isinstance(tasks_cfg, Mapping):
        raise ConfigError(f"downstream_tasks: expected a mapping of named blocks, got {type(tasks_cfg).__name__}")
    evaluators = {name: build(block, f"downstream_tasks.{name}", base=DownstreamEvaluator)
                  for name, block in tasks_cfg.items() if is_enabled(block)}
    if data is not None:
        valid = [*RESERVED_DATASETS, *data.test_set_names]
        for name, evaluator in evaluators.items():
            try:
                evaluator.check_datasets(valid)
            except ValueError as err:
                raise ConfigError(f"downstream_tasks.{name}.{err}") from err
    execution_order(evaluators)
    return evaluators


def execution_order(evaluators: Mapping[str, DownstreamEvaluator]) -> list[tuple[str, DownstreamEvaluator]]:
    """Blocks in running order: a block runs once no remaining block provides what it requires; among the
    blocks free to run, providers of a :data:`MODEL_INPUTS` artifact go first (every model output depends on
    them), then other providers, then YAML order.

    Raises:
        ConfigError: the blocks' requirements form a cycle.
    """
    remaining = list(evaluators.items())
    ordered: list[tuple[str, DownstreamEvaluator]] = []
    while remaining:
        pending = {t for _, e in remaining for t in e.spec.provides}
        ready = [(n, e) for n, e in remaining if not any(t in pending for t in e.spec.requires.values())]
        if not ready:
            raise ConfigError(f"downstream_tasks: {', '.join(n for n, _ in remaining)} require each other's products")
        pick = next((item for item in ready if set(item[1].spec.provides) & set(MODEL_INPUTS)), None) \
            or next((item for item in ready if item[1].spec.provides), ready[0])
        ordered.append(pick)
        remaining.remove(pick)
    return ordered


def run_tasks(evaluators: Mapping[str, DownstreamEvaluator], ctx: EvalContext,
              artifacts: Sequence[Thresholds] = ()) -> Iterator[tuple[str, TaskResult]]:
    """Run the blocks in :func:`execution_order`, handing each the artifacts it declares.

    A provided artifact is saved to ``ctx.artifact_dir`` (when set) and handed to every later block that
    declares a parameter of its type; a :class:`MaskCalibration` also to the context, which passes its value to
    every later ``get_anomaly`` call. A block that requires a type nobody provided gets the one in
    ``artifacts``, else the one saved in ``ctx.artifact_dir`` by an earlier evaluation, else None.

    Yields:
        ``(block name, result)`` in running order.
    """
    products: dict[type, Thresholds] = {type(a): a for a in artifacts}
    for name, evaluator in execution_order(evaluators):
        logger.info("evaluation task %r (%s)", name, evaluator.task)
        given = {param: products.get(t) or _saved(t, ctx) for param, t in evaluator.spec.requires.items()}
        start = time.perf_counter()
        result = evaluator(ctx, **given)
        for t in evaluator.spec.provides:
            found = [a for a in result.artifacts if isinstance(a, t)]
            if len(found) != 1:
                raise RuntimeError(f"task {evaluator.task!r} declares it provides {t.__name__} but returned "
                                   f"{len(found)}")
            product = found[0]
            if ctx.artifact_dir is not None:
                product = product.save(ctx.artifact_dir / t.FILE_NAME)
                result.notes.append(f"{t.__name__} written to {product.source}.")
            products[t] = product
            if isinstance(product, MaskCalibration):
                ctx.use_mask_calibration(product)
        result.notes.append(f"Took {time.perf_counter() - start:.1f} s (including any first inference of its sets).")
        yield name, result


def _saved(kind: type[Thresholds], ctx: EvalContext) -> Thresholds | None:
    if ctx.artifact_dir is None or not (ctx.artifact_dir / kind.FILE_NAME).is_file():
        return None
    return kind.load(ctx.artifact_dir / kind.FILE_NAME)


def run_downstream(evaluators: Mapping[str, DownstreamEvaluator], *, model: AnomalyModel, data: DataSource,
                   run: Run, progress: bool = True) -> Metrics:
    """Run built evaluation blocks for a run and record everything.

    Args:
        evaluators: from :func:`build_downstream`.
        model: trained model (best weights loaded, eval mode, on ``run.device``).
        data: the data module.
        run: the run: results go to ``run.logger`` (a :class:`~core.evaluation.protocols.MetricSink`), provenance
            to its manifest (``run.update_manifest``), files into ``run.run_dir``.

    Returns:
        ``{block name: {dataset: {metric: value}}}``; also writes ``checkpoints/thresholds.json``,
        ``report.md`` and the per-image numbers (``per_image/<dataset>.npz``, :mod:`core.evaluation.per_image`);
        metrics go to ``run.logger`` as ``eval/<block>/<dataset>/<metric>``, the inference cost as
        ``eval/cost/<dataset>/s_per_image`` (and ``/network_calls`` when the model counts them), every backend
        used (:meth:`EvalContext.all_backends`) to the manifest (``backends``), wandb's config and the report, with
        the run's ``training_model_mode`` (train or reference, see ``core.Trainer``) when it trained.
    """
    ctx = EvalContext.from_run(model=model, data=data, run=run, progress=progress)
    logger: MetricSink = run.logger
    results: Metrics = {}
    reports: list[tuple[str, TaskResult]] = []
    for name, result in run_tasks(evaluators, ctx):
        for dataset, metrics in result.metrics.items():
            logger.log_eval(name, dataset, metrics)
        for key, fig in result.figures.items():
            logger.log_figure(f"eval/{name}/{key}", fig)
        for key, rows in result.tables.items():
            logger.log_table(f"eval/{name}/{key}", rows)
        model_settings = ctx.model_settings()  # after the task: a model may build its backends on first use
        if model_settings and any(result.metrics.values()):
            result.manifest["model"] = model_settings  # every number here rests on the model's outputs
        if result.manifest:
            run.update_manifest(**{f"eval/{name}": result.manifest})
        results[name] = result.metrics
        reports.append((name, result))
    for dataset, cost in cost_metrics(ctx.cost).items():
        logger.log_eval(COST_BLOCK, dataset, cost)
    backends = ctx.all_backends()
    trained = run.manifest().get("training_model_mode")  # written by the Trainer of this run
    if trained:
        backends["training_model_mode"] = trained
    run.update_manifest(backends=backends, inference_cost=ctx.cost)
    logger.update_config(backends=backends)
    if reports:
        write_report(Path(run.run_dir) / "report.md", reports, {n: e.task for n, e in evaluators.items()},
                     backends=backends, cost=ctx.cost)
        write_per_image(Path(run.run_dir) / "per_image", {name: result.per_image for name, result in reports})
    return results


def cost_metrics(cost: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-dataset inference cost (``s_per_image``, ``network_calls`` when counted) and the image-weighted
    mean over every dataset the model ran on (``all_datasets``), logged as ``eval/cost/<dataset>/<metric>``."""
    out = {name: {k: v for k, v in c.items() if k != "n_images"} for name, c in cost.items()}
    if cost:
        n = sum(c["n_images"] for c in cost.values())
        out["all_datasets"] = {key: sum(c[key] * c["n_images"] for c in cost.values()) / n
                               for key in ("s_per_image", "network_calls") if all(key in c for c in cost.values())}
    return out


def evaluate(model: AnomalyModel, data: DataSource, tasks: Mapping[str, DownstreamEvaluator], *,
             device: torch.device | str | None = None, seed: int = 0, thresholds: Thresholds | None = None,
             progress: bool = False) -> Metrics:
    """Evaluate an in-memory model with the registered tasks, without a run folder or a logger.

    Same task functions, evaluation regions, inference caching and per-dataset seeding as a run; figures are
    closed, nothing is written.

    Args:
        model: the model (its eval mode is set by the context).
        data: any :class:`DataSource` (a DataModule).
        tasks: ``{name: DownstreamEvaluator(task=..., **options)}``.
        device: where the model runs (default: the device of its first parameter, else the CPU).
        seed: each dataset's inference generator is seeded with it.
        thresholds: healthy thresholds for tasks that need them when no 'thresholding' task is among ``tasks``.
        progress: tqdm bars on a TTY.

    Returns:
        ``{name: {dataset: {metric: value}}}``.
    """
    import matplotlib.pyplot as plt

    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ctx = EvalContext(model=model, data=data, device=device, seed=seed, progress=progress)
    results: Metrics = {}
    for name, result in run_tasks(tasks, ctx, artifacts=() if thresholds is None else (thresholds,)):
        for figure in result.figures.values():
            plt.close(figure)
        results[name] = result.metrics
    return results
