"""The README's quickstart results, regenerated from a run folder instead of typed.

Usage::

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    python core/Main.py --config_path projects/normative_eval/configs/quickstart.yaml
    python -m tools.results_table runs/normative_eval/quickstart/<timestamp> --readme README.md

Reads the run folder's ``metrics.json``, ``config.yaml`` and ``manifest.json`` and writes a Markdown block: one row
per class (image AUROC, pixel AUROC, AUPRO, Dice and pixel TPR at the healthy-FPR threshold, oracle Dice, images
detected, CACI), then RQI, AHI (with its FIDs and their common n) and CACI over all annotated images, the healthy
test subjects' false-positive rates at every healthy threshold (median, IQR, share with any false-positive pixel),
the calibrated p-values' empirical FPR at each alpha (with its Clopper-Pearson interval and the range a valid
calibration gives it) and their power per class, and where the numbers come from (run folder, git commit, command,
torch threads, LPIPS and FID backends). The blocks are the ones of ``_base/evaluation.yaml``: ``detection``,
``segmentation``, ``localization``, ``rqi``, ``ahi``, ``caci``, ``healthy_fpr``, ``score_calibration``,
``p_values``; the classes are the test sets with a ``segmentation`` row, in config order. A block the run did not
have is left out.

Without ``--readme`` the block is printed. With it, the text between the markers
``<!-- results:quickstart:begin -->`` and ``<!-- results:quickstart:end -->`` is replaced (the markers stay);
missing or repeated markers are an error and the file is left untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.Configurator import ConfigError, read_yaml

BEGIN = "<!-- results:quickstart:begin -->"
END = "<!-- results:quickstart:end -->"
COLUMNS = ("class", "image AUROC", "pixel AUROC", "AUPRO", "Dice @ {fpr} healthy FPR", "pixel TPR @ {fpr} healthy FPR",
           "oracle Dice (upper bound)", "detected", "CACI")


def _num(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float("nan") if value is None else float(value)  # metrics.json stores non-finite values as null


def _f(value: float, digits: int = 3) -> str:
    return "nan" if math.isnan(value) else f"{value:.{digits}f}"


def _g(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.3g}"


def _classes(metrics: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
    """Test sets with a segmentation row, in the config's order (sorted when the config does not list them)."""
    present = {k.split("/")[2] for k in metrics if k.startswith("eval/segmentation/") and k.endswith("/auroc_pooled")}
    test = ((config.get("data") or {}).get("params") or {}).get("test") or {}
    ordered = [name for name in test if name in present]
    return ordered + sorted(present - set(ordered))


def results_block(run_dir: str | Path) -> str:
    """The Markdown block (without the markers) for the run folder ``run_dir``.

    Raises:
        FileNotFoundError: ``metrics.json`` is missing; ValueError: it holds no segmentation results.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path}: not found; is {run_dir} a finished run folder?")
    metrics = json.loads(metrics_path.read_text())
    config = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    classes = _classes(metrics, config)
    if not classes:
        raise ValueError(f"{metrics_path}: no eval/segmentation/<class>/auroc_pooled keys")
    fpr = (((config.get("downstream_tasks") or {}).get("segmentation") or {}).get("params") or {}).get("fpr")
    header = [c.format(fpr=f"{fpr * 100:g} %" if isinstance(fpr, int | float) else "the") for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for name in classes:
        seg, loc = f"eval/segmentation/{name}", f"eval/localization/{name}"
        detected, total = _num(metrics, f"{loc}/n_detected"), _num(metrics, f"{loc}/n_total")
        cells = [name.replace("_", " "), _f(_num(metrics, f"eval/detection/{name}/auroc")),
                 _f(_num(metrics, f"{seg}/auroc_pooled")), _f(_num(metrics, f"{seg}/aupro")),
                 _f(_num(metrics, f"{seg}/dice_pooled")), _f(_num(metrics, f"{seg}/tpr_pooled")),
                 _f(_num(metrics, f"{seg}/oracle_best_dice_pooled")),
                 "nan" if math.isnan(total) else f"{detected:.0f} / {total:.0f}",
                 _f(_num(metrics, f"eval/caci/{name}/caci"))]
        lines.append("| " + " | ".join(cells) + " |")
    rqi = next((k.rsplit("/", 1)[0] for k in sorted(metrics) if k.startswith("eval/rqi/") and k.endswith("/rqi")), None)
    backends = manifest.get("backends") or {}
    parts = []
    if rqi is not None:
        parts.append(f"RQI {_f(_num(metrics, f'{rqi}/rqi'))} on `{rqi.split('/')[2]}` (SSIM "
                     f"{_f(_num(metrics, f'{rqi}/ssim_mean'))}, LPIPS {_f(_num(metrics, f'{rqi}/lpips_mean'))})")
    ahi = "eval/ahi/all_pathological"
    if f"{ahi}/ahi" in metrics:
        parts.append(f"AHI {_f(_num(metrics, f'{ahi}/ahi'), 2)} over all pathological sets (FID(P,N) "
                     f"{_g(_num(metrics, f'{ahi}/fid_p'))}, FID(R(P),N) {_g(_num(metrics, f'{ahi}/fid_rp'))}, "
                     f"FID(U,N) {_g(_num(metrics, f'{ahi}/fid_u'))}, each at n = {_num(metrics, f'{ahi}/n_fid'):.0f}, "
                     f"mean of {_num(metrics, f'{ahi}/draws'):.0f} subsamples)")
    if "eval/caci/all_annotated/caci" in metrics:
        parts.append(f"CACI {_f(_num(metrics, 'eval/caci/all_annotated/caci'))} over all annotated images")
    lines += ["", "; ".join(parts) + "." if parts else "No RQI/AHI/CACI in this run."]
    lines += [text for text in (_healthy_fpr(metrics), _calibration(metrics, classes)) if text]
    git = manifest.get("git") or {}
    commit = f"{str(git.get('commit'))[:12]}{' (uncommitted changes)' if git.get('dirty') else ''}"
    command = "python " + " ".join(manifest["command"]) if manifest.get("command") else "unknown"
    source = [f"run `{run_dir.name}`", f"commit `{commit}`", f"command `{command}`",
              f"torch threads {manifest.get('torch_threads', 'unknown')}"]
    source += [f"{key} {value}" for key, value in backends.items() if key in ("rqi_caci_lpips", "fid_network")]
    lines += ["", "Generated by `python -m tools.results_table <run folder> --readme README.md` from " +
              ", ".join(source) + "."]
    return "\n".join(lines)


def _percent(fraction: float) -> str:
    return "nan" if math.isnan(fraction) else f"{fraction * 100:.0f} %"


def _healthy_fpr(metrics: Mapping[str, Any]) -> str:
    """The healthy test subjects' FPR distribution at every healthy threshold (block ``healthy_fpr``)."""
    keys = [k for k in metrics if k.startswith("eval/healthy_fpr/") and k.endswith("_median")]
    if not keys:
        return ""
    base = keys[0].split("/")[:3]
    prefix = "/".join(base)
    tags = sorted({k.rsplit("/", 1)[1][: -len("_median")] for k in keys if k.startswith(prefix)},
                  key=lambda t: float(t[3:-3]))
    subjects, slices = _num(metrics, f"{prefix}/n_subjects"), _num(metrics, f"{prefix}/n_slices")
    parts = [f"at the {t[3:-3]} % threshold median {_f(_num(metrics, f'{prefix}/{t}_median'))} (IQR "
             f"{_f(_num(metrics, f'{prefix}/{t}_q25'))}-{_f(_num(metrics, f'{prefix}/{t}_q75'))}), "
             f"{_percent(_num(metrics, f'{prefix}/{t}_any_fp'))} of subjects with a false-positive pixel" for t in tags]
    per = slices / subjects
    return (f"\nFalse-positive rate per healthy test subject (`{base[2]}`, n = {subjects:.0f} subjects, "
            f"{per:.3g} slice{'' if per == 1 else 's'} each{'' if per == int(per) else ' on average'}): "
            + "; ".join(parts) + ".")


def _rates(metrics: Mapping[str, Any], prefix: str, alphas: Sequence[float]) -> str:
    """'at alpha a: FPR (95 % interval lo-hi; a valid calibration gives lo-hi: valid)' per alpha of one level."""
    rates = []
    for alpha in alphas:
        key = f"{prefix}_alpha{alpha:g}pct"
        valid = "valid" if _num(metrics, key.replace("_fpr_", "_valid_")) == 1 else "NOT valid"
        rates.append(f"at alpha {alpha / 100:g}: {_f(_num(metrics, key))} (95 % interval "
                     f"{_f(_num(metrics, f'{key}_low'))}-{_f(_num(metrics, f'{key}_high'))}; a valid calibration "
                     f"gives {_f(_num(metrics, f'{key}_accept_low'))}-{_f(_num(metrics, f'{key}_accept_high'))}: "
                     f"{valid})")
    return "; ".join(rates)


def _calibration(metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Empirical FPR of the calibrated p-values and their power (blocks ``score_calibration``, ``p_values``)."""
    healthy = next((k.split("/")[2] for k in metrics if k.startswith("eval/p_values/") and "/image_fpr_n" in k), None)
    if healthy is None:
        return ""
    h = f"eval/p_values/{healthy}"
    alphas = sorted({float(k.split("_alpha")[1].split("pct")[0]) for k in metrics
                     if k.startswith(f"{h}/image_fpr_alpha") and k.endswith("pct")})
    calibration = next((k.rsplit("/", 1)[0] for k in metrics if k.startswith("eval/score_calibration/")
                        and k.endswith("/n_images")), None)
    source = "" if calibration is None else (
        f" against `{calibration.split('/')[2]}` (n = {_num(metrics, f'{calibration}/n_images'):.0f} images, "
        f"{_num(metrics, f'{calibration}/n_subjects'):.0f} subjects)")
    n_images, n_subjects = _num(metrics, f"{h}/image_fpr_n"), _num(metrics, f"{h}/subject_fpr_n")
    text = (f"\nCalibrated p-values{source}: empirical false-positive rate on `{healthy}` per image (n = "
            f"{n_images:.0f}) " + _rates(metrics, f"{h}/image_fpr", alphas))
    if n_subjects != n_images:
        text += f"; per subject (n = {n_subjects:.0f}) " + _rates(metrics, f"{h}/subject_fpr", alphas)
    at = 5.0 if 5.0 in alphas else alphas[len(alphas) // 2]
    power = [f"{name.replace('_', ' ')} {_f(_num(metrics, f'eval/p_values/{name}/image_power_alpha{at:g}pct'), 2)}"
             for name in classes if f"eval/p_values/{name}/image_power_n" in metrics]
    return text + "." + (f" Power per image at alpha {at / 100:g}: " + ", ".join(power) + "." if power else "")


def replace_block(text: str, block: str, *, source: str = "README") -> str:
    """``text`` with everything between :data:`BEGIN` and :data:`END` replaced by ``block``.

    Raises:
        ValueError: a marker is missing, repeated or out of order.
    """
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{source}: needs exactly one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.results_table", description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a finished quickstart run folder (metrics.json, config.yaml, manifest.json)")
    parser.add_argument("--readme", help="Markdown file whose results block is replaced (else the block is printed)")
    args = parser.parse_args(argv)
    try:
        block = results_block(args.run)
        if args.readme is None:
            print(block)
            return 0
        readme = Path(args.readme)
        readme.write_text(replace_block(readme.read_text(encoding="utf-8"), block, source=str(readme)),
                          encoding="utf-8")
    except (FileNotFoundError, ValueError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"updated {args.readme} from {args.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
