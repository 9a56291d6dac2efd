"""The study's outputs: Markdown tables, CSVs, figures, the README block and the wandb summary run.

In the study folder (``<output_dir>/<experiment>/_studies/<name>/``):

* ``study.md``: detection (image AUROC per class, ``all_pathological`` first), segmentation (pooled pixel AUROC per
  class), normative learning (RQI, AHI, CACI, combined) and cost tables; each quality cell reads
  ``mean ± spread across seeds [bootstrap interval]``, the column's best in bold, "≈" beside a method not
  distinguishable from it; then the correlation analysis and the agreement with the reference study;
* ``study.csv`` (one row per method, every number: value, seed sd, interval, p-value against the best),
  ``comparisons.csv`` (every method against each column's best: difference, interval, p, verdict),
  ``correlations.csv`` and ``agreement.csv``;
* ``figures/``: heatmaps of image AUROC, pixel AUROC and the indices (the mean values), cost against detection,
  and the heatmap of the rank correlations;
* ``summary/``: the study's wandb run (offline unless ``WANDB_MODE`` says otherwise; group = the study, job type
  ``study``) with these tables as wandb Tables, the figures and the agreement numbers.

A column no method has a value for is left out of ``study.md`` and named under the tables; "–" marks a single
missing value.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from core.Configurator import ConfigError
from tools.study.analysis import CAVEAT, Agreement, CorrelationRow
from tools.study.evidence import INDEX_COLUMNS, Cell, Evidence
from tools.study.plan import REPO, Study
from tools.study.results import AHI_UNCLIPPED, ALL_CLASSES, IMAGE, PIXEL, RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)
MISSING = "–"
TABLES = (("Detection (image AUROC)", IMAGE), ("Segmentation (pixel AUROC, pooled over the evaluation region)", PIXEL),
          ("Normative learning", None), ("Cost", None))


def fmt(value: object) -> str:
    """Metrics in [0, 1] with 3 decimals; values >= 10 and whole counts > 1 as integers; small costs with 2
    significant digits (0.00033 s, not 0.000); NaN as "–"."""
    if isinstance(value, float):
        if math.isnan(value):
            return MISSING
        if abs(value) >= 10 or (value.is_integer() and abs(value) > 1):
            return f"{value:.0f}"
        if 0 < abs(value) < 0.01:
            return f"{value:.2g}"
        return f"{value:.3f}"
    return str(value)


def cell_text(cell: Cell) -> str:
    """``0.721 ± 0.012 [0.68, 0.76]`` (spread only with two or more seeds, interval only when there is one),
    the value in bold for the column's best, " ≈" after a method not distinguishable from it."""
    if math.isnan(cell.value):
        return MISSING
    text = f"**{cell.value:.3f}**" if cell.mark == "best" else f"{cell.value:.3f}"
    if math.isfinite(cell.spread):
        text += f" ± {cell.spread:.3f}"
    if math.isfinite(cell.low) and math.isfinite(cell.high):
        text += f" [{cell.low:.2f}, {cell.high:.2f}]"
    return text + (" ≈" if cell.mark == "tied" else "")


def _header(column: str, suffix: str | None) -> str:
    return column.removesuffix(suffix).replace("_", " ") if suffix else column


def table_columns(evidence: Evidence) -> list[tuple[str, list[str]]]:
    """(title, non-empty columns) of each Markdown table; a table without a non-empty column is left out."""
    out = []
    empty = set(empty_columns(evidence))
    for title, suffix in TABLES:
        if suffix is not None:
            columns = [c for c in evidence.quality if c.endswith(suffix)]
        elif title == "Cost":
            columns = list(evidence.cost)
        else:
            columns = [*INDEX_COLUMNS, AHI_UNCLIPPED]
        columns = [c for c in columns if c not in empty]
        if columns:
            out.append((title, columns))
    return out


def empty_columns(evidence: Evidence) -> list[str]:
    """The columns whose value is NaN for every method, in table order."""
    return [c for c in evidence.columns if all(math.isnan(evidence.cells[m][c].value) for m in evidence.methods)]


def _grid(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def comparison_markdown(evidence: Evidence) -> str:
    """The four tables with their legend and the list of empty columns."""
    if not evidence.methods:
        return "(no finished runs)\n"
    parts = []
    suffixes = dict(TABLES)
    for title, columns in table_columns(evidence):
        header = ["method", *(_header(c, suffixes[title]) for c in columns)]
        quality = title != "Cost"
        rows = [[m, *(cell_text(evidence.cells[m][c]) if quality else fmt(evidence.cells[m][c].value)
                      for c in columns)] for m in evidence.methods]
        parts.append(f"**{title}**\n\n{_grid(rows, header)}")
    s = evidence.statistics
    seeds = [x for x in evidence.seeds if x is not None]
    spread = (f"mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}) ± the standard deviation across seeds"
              if len(seeds) > 1 else "one run per method (no spread across seeds)")
    parts.append(f"Each quality cell: {spread}, [the {s.level * 100:g} % bootstrap interval over the evaluation "
                 f"images: {s.replicates} resamples of every dataset's subjects with replacement (one image per "
                 "subject unless the splits name subjects), the same for every method and seed]. **Bold**: "
                 f"the column's best; ≈: not distinguishable from it (paired bootstrap p >= {s.alpha:g}; "
                 "`comparisons.csv` has every difference, its interval and p). Combined = ((harmonic mean of RQI and "
                 "CACI) + AHI) / 2 on the raw indices. AHI (unclipped): (FID(P,N) - FID(R(P),N)) / "
                 "(FID(P,N) - FID(U,N)) before AHI's clip to [0, 1]; below 0 the restorations are further from the "
                 "healthy images than the pathological inputs (in units of the P-U gap), which the clipped AHI cannot "
                 "rank. Cost: the mean over the seeds' runs.\n")
    dropped = empty_columns(evidence)
    if dropped:
        parts.append("Left out, no method has a value (not computed in these runs): "
                     + ", ".join(f"`{c}`" for c in dropped) + ".\n")
    return "\n".join(parts)


def _short(target: str) -> str:
    for suffix, kind in ((IMAGE, "image"), (PIXEL, "pixel")):
        if target.endswith(suffix):
            return f"{target.removesuffix(suffix).replace('_', ' ')} ({kind})"
    return target


def _test_text(estimate: float, low: float, high: float, p: float) -> str:
    if math.isnan(estimate):
        return MISSING
    interval = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) else ""
    return f"{estimate:.2f}{interval} p={p:.2g}"


def correlation_markdown(rows: Sequence[CorrelationRow], n_methods: int) -> str:
    """Rows: per-pathology numbers; columns: the indices; cells: rho [interval] p."""
    if not rows:
        return ""
    targets = list(dict.fromkeys(r.target for r in rows))
    by = {(r.index, r.target): r.test for r in rows}
    indices = list(dict.fromkeys(r.index for r in rows))
    body = [[_short(t), *(_test_text(by[i, t].estimate, by[i, t].low, by[i, t].high, by[i, t].p_value)
                          for i in indices)] for t in targets]
    return (f"**Do methods with high indices find more pathologies? (Spearman's rho across {n_methods} methods)**\n\n"
            + _grid(body, ["per-pathology number", *indices])
            + "\nrho [bootstrap interval over methods] p = permutation p-value (two-sided); few methods make wide "
              "intervals: read the signs and sizes, not single p-values.\n")


def agreement_markdown(result: Agreement, source: Path) -> str:
    """Kendall's tau per index against the reference study, with the caveat."""
    body = [[index, _test_text(t.estimate, t.low, t.high, t.p_value), str(t.n)] for index, t in result.rows]
    matched = ", ".join(f"{m} = {r}" for m, r in result.matched.items()) or "none"
    unmatched = f" Not in the reference: {', '.join(result.unmatched)}." if result.unmatched else ""
    shown = source.relative_to(REPO) if source.is_relative_to(REPO) else source
    return ("**Agreement with the reference study's rankings (Kendall's tau-b)**\n\n"
            + _grid(body, ["index", "tau [interval] p", "methods"])
            + f"\n{CAVEAT} Reference values: `{shown}`. Matched: {matched}.{unmatched}\n")


# ---------------------------------------------------------------------------------------------- flat tables
def flat_rows(evidence: Evidence) -> list[dict[str, object]]:
    """``study.csv``: per method, every quality column's value, seed sd, interval, p vs best, and the cost."""
    rows = []
    for m in evidence.methods:
        row: dict[str, object] = {"method": m, "seeds": max(c.seeds for c in evidence.cells[m].values())}
        for column in evidence.quality:
            cell = evidence.cells[m][column]
            row.update({column: cell.value, f"{column} seed sd": cell.spread, f"{column} low": cell.low,
                        f"{column} high": cell.high, f"{column} p vs best": cell.p_value,
                        f"{column} mark": cell.mark})
        for column in evidence.cost:
            row[column] = evidence.cells[m][column].value
        rows.append(row)
    return rows


def comparison_rows(evidence: Evidence) -> list[dict[str, object]]:
    return [{**asdict(c), "distinguishable": "" if c.distinguishable is None else str(c.distinguishable).lower()}
            for c in evidence.comparisons]


def correlation_rows(rows: Sequence[CorrelationRow]) -> list[dict[str, object]]:
    return [{"index": r.index, "target": r.target, "rho": r.test.estimate, "low": r.test.low, "high": r.test.high,
             "p_value": r.test.p_value, "n_methods": r.test.n, "n_replicates": r.test.n_replicates,
             "exact_permutations": r.test.exact} for r in rows]


def agreement_rows(result: Agreement) -> list[dict[str, object]]:
    methods = ";".join(f"{m}={r}" for m, r in result.matched.items())
    return [{"index": index, "kendall_tau": t.estimate, "low": t.low, "high": t.high, "p_value": t.p_value,
             "n_methods": t.n, "n_replicates": t.n_replicates, "exact_permutations": t.exact, "methods": methods}
            for index, t in result.rows]


def write_csv(path: Path, rows: Sequence[Mapping[str, object]], empty_header: Sequence[str] = ("method",)) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(empty_header))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- figures
def figures(evidence: Evidence, correlation: Sequence[CorrelationRow]) -> dict[str, tuple[str, Figure]]:
    """The study's figures: kind -> (file name, figure), drawn from the cells' mean values."""
    from dl_utils.visualization import cost_vs_quality, heatmap

    by_title = dict(table_columns(evidence))
    grids = {"image AUROC": ("image_auroc.png", by_title.get(TABLES[0][0], []), IMAGE,
                             "Detection: image AUROC per pathology class"),
             "pixel AUROC": ("pixel_auroc.png", by_title.get(TABLES[1][0], []), PIXEL,
                             "Segmentation: pixel AUROC per pathology class (pooled)"),
             "indices": ("indices.png", by_title.get(TABLES[2][0], []), None,
                         "Normative-learning indices and the combined score")}
    out: dict[str, tuple[str, Figure]] = {}
    for kind, (name, columns, suffix, title) in grids.items():
        values = {m: {_header(c, suffix): evidence.cells[m][c].value for c in columns} for m in evidence.methods}
        out[kind] = (name, heatmap(values, title=title))
    detection = ALL_CLASSES + IMAGE
    points = {m: (evidence.cells[m]["wall s"].value, evidence.cells[m].get(detection, Cell(value=math.nan)).value)
              for m in evidence.methods}
    out["cost vs detection"] = ("cost_vs_detection.png", cost_vs_quality(
        points, xlabel="wall time of the run (s)", ylabel=f"{ALL_CLASSES} image AUROC", title="Cost vs detection"))
    rho = {r.index: {} for r in correlation}
    for r in correlation:
        rho[r.index][_short(r.target)] = r.test.estimate
    out["correlation heatmap"] = ("correlations.png", heatmap(
        rho, title=f"Spearman's rho across {len(evidence.methods)} methods: index vs per-pathology number",
        vmin=-1.0, vmax=1.0, cmap="RdBu_r"))
    return out


# ---------------------------------------------------------------------------------------------- writing
def header(study: Study, n_methods: int, total_wall_s: float | None) -> str:
    source = study.source.relative_to(REPO) if study.source.is_relative_to(REPO) else study.source
    text = (f"Study `{study.name}`: {n_methods} methods; command: `python -m tools.study {source}`.\n"
            "Image AUROC: detection; pixel AUROC: segmentation, pooled over the evaluation region (the brain).\n")
    if total_wall_s is not None and not math.isnan(total_wall_s):
        text += (f"Total wall time of the runs: {total_wall_s / 60:.1f} min on {os.cpu_count()} CPUs (sum over the "
                 "runs, stage 1 included); load avg: the mean 1-minute load average during each run.\n")
    return text


def write_outputs(study: Study, evidence: Evidence, results: Sequence[RunResult], correlation: Sequence[CorrelationRow],
                  agreement: Agreement | None, *, readme: Path | None = None, total_wall_s: float | None = None,
                  wandb: bool = True) -> dict[str, Path]:
    """Every output of the study folder (see the module docstring); optionally the README block. Paths by kind."""
    folder = study.folder
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "study.md",
             "csv": write_csv(folder / "study.csv", flat_rows(evidence)),
             "comparisons": write_csv(folder / "comparisons.csv", comparison_rows(evidence), ("column",)),
             "correlations": write_csv(folder / "correlations.csv", correlation_rows(correlation), ("index",))}
    body = comparison_markdown(evidence)
    analysis = correlation_markdown(correlation, len(evidence.methods))
    if agreement is not None and study.reference is not None:
        paths["agreement"] = write_csv(folder / "agreement.csv", agreement_rows(agreement), ("index",))
        analysis += "\n" + agreement_markdown(agreement, study.reference)
    text = header(study, len(evidence.methods), total_wall_s) + "\n" + body + ("\n" + analysis if analysis else "")
    runs = "\n".join(f"- {r.job.key}: `{r.run}`" for r in results)
    paths["markdown"].write_text(f"# {study.name}\n\n{text}\nRun folders:\n{runs}\n", encoding="utf-8")
    drawn = figures(evidence, correlation)
    for kind, (name, fig) in drawn.items():
        paths[kind] = folder / "figures" / name
        fig.savefig(paths[kind], dpi=110, bbox_inches="tight")
    if wandb:
        paths["summary"] = log_summary(study, evidence, correlation, agreement, {k: f for k, (_, f) in drawn.items()})
    if readme is not None:
        update_readme(readme, study.name, text)
        paths["readme"] = readme
    return paths


def log_summary(study: Study, evidence: Evidence, correlation: Sequence[CorrelationRow], agreement: Agreement | None,
                drawn: Mapping[str, Figure]) -> Path:
    """The study's wandb run in ``<study>/summary`` (group = the study, job type 'study'), a
    :class:`~dl_utils.run.Run` with its ``config.yaml`` and manifest (git state, packages, status): the tables as wandb
    Tables (``study/tables/<name>``), the figures (``study/figures/<name>``), and the agreement numbers as
    ``agreement/<index>/{kendall_tau,low,high,p_value,n_methods}``."""
    import torch

    from dl_utils.run import Run

    folder = study.folder / "summary"
    config = {"study": str(study.source), "methods": list(evidence.methods),
              "seeds": [s for s in evidence.seeds if s is not None], "statistics": asdict(study.statistics)}
    run = Run(run_dir=folder, device=torch.device("cpu"), config=config)
    with run.recording(task="study"):  # the summary is a run like the others: config.yaml, manifest, status
        run.start(config_path=study.source, task="study")
        log = run.open_logger(mode="offline", project=study.experiment, name=f"{study.name}/summary",
                              group=study.name, job_type="study", notes=CAVEAT if agreement else None)
        log.log_table("study/tables/comparison", flat_rows(evidence))
        log.log_table("study/tables/comparisons", comparison_rows(evidence))
        log.log_table("study/tables/correlations", correlation_rows(correlation))
        if agreement is not None:
            log.log_table("study/tables/agreement", agreement_rows(agreement))
            log.log_scalars({f"agreement/{r['index']}/{k}": r[k] for r in agreement_rows(agreement)
                             for k in ("kendall_tau", "low", "high", "p_value", "n_methods")})
        for kind, fig in drawn.items():
            log.log_figure(f"study/figures/{kind.replace(' ', '_')}", fig)
    return folder


def update_readme(readme: Path, name: str, text: str) -> None:
    """Replace the block between the study's begin/end markers in ``readme`` (both markers must exist)."""
    begin, end = f"<!-- study:{name}:begin -->", f"<!-- study:{name}:end -->"
    content = readme.read_text(encoding="utf-8")
    if begin not in content or end not in content or content.index(begin) > content.index(end):
        raise ConfigError(f"{readme}: needs the markers {begin} ... {end} (in that order) around the study table")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{tail}", encoding="utf-8")
