"""Evaluation after training: a registry of small task functions, one runner, thresholds as data.

YAML (the earlier module path ``core.DownstreamEvaluator`` still resolves here: ``core.Configurator.MODULE_ALIASES``)::

    downstream_tasks:
      thresholds:   {module_name: core.evaluation, class_name: DownstreamEvaluator,
                     params: {task: thresholding, dataset: val, fprs: [0.01, 0.02, 0.05]}}
      segmentation: {module_name: core.evaluation, class_name: DownstreamEvaluator, enabled: true,
                     params: {task: segmentation, datasets: [atlas], fpr: 0.05}}

Modules:

- :mod:`.registry`: :func:`register_task`, :data:`TASKS`, :class:`TaskResult`, option markers
  (:data:`DatasetName`, :data:`Fpr`, ...) and the checks they imply;
- :mod:`.context`: :class:`EvalContext` (model inference **once per dataset**, cached, never augmented, each
  dataset with its own generator seeded with the run seed) and :class:`Inference`;
- :mod:`.thresholds`: :class:`Thresholds`, the typed healthy operating points and their JSON file;
- :mod:`.tasks`: thresholding; detection, segmentation, localization; rqi, ahi, caci;
- :mod:`.report`: ``report.md``;
- :mod:`.runner`: :class:`DownstreamEvaluator`, :func:`build_downstream`, :func:`run_downstream`, :func:`evaluate`;
- :mod:`.protocols`: :class:`DataSource` (what the data module provides), :class:`MetricSink` (the logger).

Build time (``core.Main``, also under ``--dry-run``): :func:`build_downstream` checks every block's task name,
option names, types and ranges (FPRs in (0, 1)), and -- given the data module -- every dataset name an option
refers to ('train', 'val' or a test set), raising a ``ConfigError`` that names the YAML path.

Run time: :func:`run_downstream` runs the blocks in dependency order -- a task that declares a parameter
``thresholds: Thresholds`` runs after the task that ``provides`` :class:`Thresholds` (``thresholding``), which
also saves them to ``checkpoints/thresholds.json``; a task's explicit YAML ``threshold`` overrides them.
Results go to the logger (``eval/<block>/<dataset>/<metric>``, figures, tables, manifest) and to ``report.md``.
Oracle numbers (best Dice over thresholds chosen on labelled test data) carry the ``oracle_`` prefix and are
upper bounds, not results.
After the tasks, the runner logs the inference cost per dataset (``eval/cost/<dataset>/s_per_image``, and
``/network_calls`` for models with a :meth:`~model_zoo.base.AnomalyModel.counted_network`) and records every
backend used (:meth:`EvalContext.all_backends`: the RQI/CACI LPIPS, the FID Inception, ``model.provenance()``, the
model's ``inference_label``) in the manifest (``backends``), wandb's config and the report's first section.

Public API for tools (a step sweep, a benchmark) that evaluate an in-memory model without a run folder::

    from core.evaluation import DownstreamEvaluator, evaluate

    metrics = evaluate(model, data, {
        "thresholds": DownstreamEvaluator(task="thresholding", dataset="val", fprs=[0.05]),
        "segmentation": DownstreamEvaluator(task="segmentation", datasets=["atlas"], fpr=0.05),
    }, device="cuda", seed=0)
    metrics["segmentation"]["atlas"]["auroc_pooled"]

``evaluate`` uses the same task functions, evaluation regions and seeding as a run; it writes nothing and
closes the figures. Pass ``thresholds=Thresholds.load(path)`` to reuse a run's operating points.
"""

from core.evaluation.context import EvalContext, Inference
from core.evaluation.protocols import DataSource, MetricSink
from core.evaluation.registry import TASKS, TaskResult, register_task
from core.evaluation.runner import (
    DownstreamEvaluator,
    build_downstream,
    evaluate,
    execution_order,
    run_downstream,
    run_tasks,
)
from core.evaluation.thresholds import Thresholds

__all__ = [
    "TASKS", "DataSource", "DownstreamEvaluator", "EvalContext", "Inference", "MetricSink", "TaskResult",
    "Thresholds", "build_downstream", "evaluate", "execution_order", "register_task", "run_downstream", "run_tasks",
]
