"""Cross-run comparison of the normative-learning indices (the reference paper's comparison view).

Usage::

    python -m tools.report runs/normative_eval/ae/<ts> runs/normative_eval/vae/<ts> [--out DIR] [--normalize]

Reads each run folder's ``metrics.json`` (flat ``eval/<block>/<dataset>/<metric>`` keys, as written by
``ExperimentLogger``) and ``config.yaml`` (for the model name), and writes into ``--out``:

* ``comparison.md``: RQI, AHI, CACI per run (raw, and min-max normalised across runs with ``--normalize``),
  the combined score ((harmonic mean of RQI and CACI) + AHI) / 2, and the per-class localisation table;
* ``comparison.csv`` and ``localization.csv``; ``indices.png`` (grouped bars).

Which keys are used: RQI = the first ``*/rqi`` key; AHI = ``*/all_pathological/ahi`` (else the mean of the
per-class AHIs); CACI = ``*/all_annotated/caci`` (else the mean over datasets). Localisation: every
``eval/<block>/<class>/f1_mean`` with its ``n_detected``/``n_total``. The sources are listed in the Markdown.
Min-max normalisation maps each index to [0,1] across the given runs; when all runs tie it is undefined
(NaN). The combined score uses the normalised values when ``--normalize`` is given.

Only finished runs are compared: a folder whose manifest says ``running``, ``failed`` or ``interrupted``, or
that has no ``metrics.json`` or holds an unreadable one, is skipped with one line on stderr saying why (a
shell glob such as ``runs/normative_eval/*/*`` may name such folders and stray files). For a ``running`` run the
line tells whether its process still runs, ``died`` when it is gone (killed without a chance to record it), with
its last heartbeat; a run owned by another host "may still be running" (its process cannot be seen from here).
A run written before run status existed (no ``status`` in its manifest) is compared, with a warning. Exit 1 when
no run is left.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.Configurator import ConfigError, read_yaml
from dl_utils.run import MANIFEST, describe_heartbeat, read_manifest, run_state
from optim.metrics.normative import combined_score

logger = logging.getLogger(__name__)
INDICES = ("rqi", "ahi", "caci")


@dataclass
class RunSummary:
    """The indices of one run and where each came from."""

    name: str
    folder: Path
    values: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    localization: dict[str, dict[str, float]] = field(default_factory=dict)


def _value(v: object) -> float:
    return float("nan") if v is None else float(v)  # metrics.json stores non-finite values as null


def _pick(metrics: Mapping[str, object], metric: str, pooled: str) -> tuple[float, str]:
    keys = sorted(k for k in metrics if k.startswith("eval/") and k.endswith(f"/{metric}"))
    if not keys:
        return float("nan"), "missing"
    preferred = [k for k in keys if k.split("/")[-2] == pooled]
    if preferred:
        return _value(metrics[preferred[0]]), preferred[0]
    if metric == "rqi":
        return _value(metrics[keys[0]]), keys[0]
    values = [_value(metrics[k]) for k in keys]
    return float(np.nanmean(values)) if any(math.isfinite(v) for v in values) else float("nan"), \
        f"mean of {len(keys)} keys ({', '.join(keys)})"


def skip_reason(folder: str | Path) -> str | None:
    """Why ``folder`` is not a finished run to compare (None when it is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = read_manifest(folder)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"{manifest_path}: unreadable ({err})"
        status = manifest.get("status") if isinstance(manifest, dict) else None
        if status is None:
            logger.warning("%s: no run status recorded (a run from before run status existed); compared as is",
                           folder)
        elif status == "running":
            state = run_state(folder)
            if state.state == "died":
                return f"the run died ({state.why}; {describe_heartbeat(state.heartbeat)}; its manifest says 'running')"
            still = "is still running" if state.owner_state == "alive" else "may still be running"
            return f"the run {still} ({state.why}; {describe_heartbeat(state.heartbeat)})"
        elif status != "finished":
            error = manifest.get("error")
            return f"the run did not finish (status {status!r}{f': {error}' if error else ''})"
    if not (folder / "metrics.json").is_file():
        partial = " (only metrics.partial.json)" if (folder / "metrics.partial.json").is_file() else ""
        return f"no metrics.json{partial}; not a finished run folder"
    return None


def read_run(folder: str | Path) -> RunSummary:
    """Read one run folder's ``metrics.json`` and ``config.yaml`` into a :class:`RunSummary`."""
    folder = Path(folder)
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: not found; is {folder} a finished run folder?")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{metrics_path}: invalid JSON: {err}") from err
    name = folder.name
    config_path = folder / "config.yaml"
    if config_path.is_file():
        config = read_yaml(config_path)
        model = config.get("model") if isinstance(config.get("model"), dict) else {}
        name = str(config.get("name") or model.get("class_name") or folder.name)
    summary = RunSummary(name=name, folder=folder)
    for index, pooled in (("rqi", ""), ("ahi", "all_pathological"), ("caci", "all_annotated")):
        summary.values[index], summary.sources[index] = _pick(metrics, index, pooled)
    for key in sorted(metrics):
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "eval" and parts[3] == "f1_mean":
            prefix = "/".join(parts[:3])
            summary.localization[parts[2]] = {
                "f1_mean": _value(metrics[key]),
                "n_detected": _value(metrics.get(f"{prefix}/n_detected")),
                "n_total": _value(metrics.get(f"{prefix}/n_total")),
            }
    return summary


def minmax(values: Sequence[float]) -> list[float]:
    """Min-max normalise across runs (NaN stays NaN; all-equal values give NaN, with a warning)."""
    arr = np.asarray(values, dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0 or finite.max() == finite.min():
        logger.warning("min-max normalisation undefined for values %s (fewer than two distinct)", arr.tolist())
        return [float("nan")] * arr.size
    return ((arr - finite.min()) / (finite.max() - finite.min())).tolist()


def compare(runs: Sequence[RunSummary], *, normalize: bool = False) -> list[dict[str, object]]:
    """One row per run: raw indices, optionally normalised ones, and the combined score."""
    rows: list[dict[str, object]] = [{"model": r.name, **{i: r.values[i] for i in INDICES}} for r in runs]
    used = {i: [float(r[i]) for r in rows] for i in INDICES}  # type: ignore[arg-type]
    if normalize:
        for index in INDICES:
            used[index] = minmax(used[index])
            for row, value in zip(rows, used[index], strict=True):
                row[f"{index}_normalized"] = value
    for k, row in enumerate(rows):
        row["combined"] = combined_score(used["rqi"][k], used["ahi"][k], used["caci"][k])
    return rows


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _markdown_table(rows: Sequence[Mapping[str, object]]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def localization_rows(runs: Sequence[RunSummary]) -> list[dict[str, object]]:
    """Per-class localisation table: one row per class, per run F1 and 'n of N' detected."""
    classes = list(dict.fromkeys(c for r in runs for c in r.localization))
    rows = []
    for cls in classes:
        row: dict[str, object] = {"class": cls}
        for r in runs:
            entry = r.localization.get(cls)
            if entry is None:
                row[f"{r.name} F1"], row[f"{r.name} detected"] = float("nan"), ""
                continue
            row[f"{r.name} F1"] = entry["f1_mean"]
            row[f"{r.name} detected"] = f"{_fmt_int(entry['n_detected'])} of {_fmt_int(entry['n_total'])}"
        rows.append(row)
    return rows


def _fmt_int(value: float) -> str:
    return "?" if not math.isfinite(value) else str(int(value))


def _unique_names(runs: Sequence[RunSummary]) -> None:
    seen: dict[str, int] = {}
    for r in runs:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name} ({r.folder.name})"


def write_report(runs: Sequence[RunSummary], out: Path, *, normalize: bool = False) -> dict[str, Path]:
    """Write comparison.md/.csv, localization.csv and indices.png into ``out``; returns their paths."""
    from dl_utils.visualization import per_class_bars

    out.mkdir(parents=True, exist_ok=True)
    rows = compare(runs, normalize=normalize)
    loc = localization_rows(runs)
    paths = {"markdown": out / "comparison.md", "csv": out / "comparison.csv",
             "localization_csv": out / "localization.csv", "figure": out / "indices.png"}
    for path, table in ((paths["csv"], rows), (paths["localization_csv"], loc)):
        with path.open("w", newline="", encoding="utf-8") as f:
            cols = list(dict.fromkeys(k for r in table for k in r)) or ["class"]
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(table)
    lines = ["# Normative-learning comparison", "",
             "RQI, AHI and CACI are this project's definitions (see optim/metrics/normative.py). "
             "combined = ((harmonic mean of RQI and CACI) + AHI) / 2"
             + (", on min-max normalised values across these runs." if normalize else ", on raw values."), "",
             *_markdown_table(rows), "", "## Localisation per class", "", *_markdown_table(loc), "",
             "## Sources", ""]
    lines += [f"- {r.name} ({r.folder}): " + "; ".join(f"{i} <- {r.sources[i]}" for i in INDICES) for r in runs]
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    key = "_normalized" if normalize else ""
    bars = {str(r["model"]): {i.upper(): float(r[f"{i}{key}"]) for i in INDICES} | {"combined": float(r["combined"])}
            for r in rows}
    fig = per_class_bars(bars, title="normative-learning indices" + (" (min-max normalised)" if normalize else ""),
                         ylim=None)
    fig.savefig(paths["figure"], dpi=110, bbox_inches="tight")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.report", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders (each with metrics.json and config.yaml)")
    parser.add_argument("--out", default="report", help="output folder (default: ./report)")
    parser.add_argument("--normalize", action="store_true", help="min-max normalise each index across the runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    runs = []
    for folder in args.runs:
        reason = skip_reason(folder)
        if reason is None:
            try:
                runs.append(read_run(folder))
                continue
            except (FileNotFoundError, ValueError, ConfigError) as err:
                reason = str(err)
        print(f"skipping {folder}: {reason}", file=sys.stderr)
    if not runs:
        print(f"error: none of the {len(args.runs)} folder(s) is a finished run", file=sys.stderr)
        return 1
    _unique_names(runs)
    paths = write_report(runs, Path(args.out), normalize=args.normalize)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
