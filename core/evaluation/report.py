"""The run folder's ``report.md``: the backends and settings, then one table per evaluation block with its notes and
provenance."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.evaluation.registry import TaskResult


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def write_report(path: Path, reports: Sequence[tuple[str, TaskResult]], tasks: Mapping[str, str], *,
                 backends: Mapping[str, str] | None = None, cost: Mapping[str, Mapping[str, float]] | None = None
                 ) -> Path:
    """Markdown report: a "Backends and settings" section (every feature network and model setting used, and the
    inference cost per dataset), then one table per evaluation block (datasets x metrics), its notes and provenance.
    """
    lines = ["# Evaluation report", "", "## Backends and settings", ""]
    if backends:
        lines += ["| what | used |", "|---|---|", *(f"| {k} | {v} |" for k, v in backends.items()), ""]
    else:
        lines += ["No feature network was used and the model reports no backends.", ""]
    if cost:
        lines += ["Inference cost (`get_anomaly` wall clock, data loading excluded):", "",
                  "| dataset | s / image | network calls / image | images |", "|---|---|---|---|"]
        lines += [f"| {name} | {_fmt(c['s_per_image'])} | {_fmt(c.get('network_calls', 'not counted'))} | "
                  f"{int(c['n_images'])} |" for name, c in cost.items()]
        lines.append("")
    lines += ["Metrics prefixed `oracle_` use thresholds chosen on labelled test data: upper bounds, not results.", ""]
    for name, result in reports:
        lines += [f"## {name} (task `{tasks[name]}`)", ""]
        if result.metrics:
            columns = list(dict.fromkeys(k for m in result.metrics.values() for k in m))
            lines.append("| dataset | " + " | ".join(columns) + " |")
            lines.append("|---" * (len(columns) + 1) + "|")
            for dataset, metrics in result.metrics.items():
                lines.append(f"| {dataset} | " + " | ".join(_fmt(metrics.get(c, "")) for c in columns) + " |")
            lines.append("")
        for table, rows in result.tables.items():
            if rows:
                cols = list(dict.fromkeys(k for r in rows for k in r))
                lines += [f"Table `{table}`:", "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
                lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
                lines.append("")
        lines += [f"- {note}" for note in result.notes]
        if result.manifest:
            lines.append(f"- provenance: `{json.dumps(result.manifest, default=str, sort_keys=True)}`")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
