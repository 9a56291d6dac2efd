"""The module YAML names for evaluation blocks (``module_name: core.DownstreamEvaluator``).

The implementation lives in the package :mod:`core.evaluation` (registry, context, thresholds, tasks, report,
runner); this module re-exports the block class and the runner so existing configs keep working.
"""

from core.evaluation.runner import DownstreamEvaluator, build_downstream, evaluate, run_downstream

__all__ = ["DownstreamEvaluator", "build_downstream", "evaluate", "run_downstream"]
