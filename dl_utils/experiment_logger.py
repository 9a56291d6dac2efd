"""The one place that talks to wandb; everything it logs also lands in the run folder.

Key names are built here: ``train/<term>``, ``val/<metric>``, ``eval/<task>/<dataset>/<metric>``. Training and
validation scalars carry ``trainer/step`` as their x-axis (wandb's own step is left to wandb, so evaluation
results logged after training never collide with it).

Run-folder files:
    history.jsonl   one JSON object per logging call (``{"step": ..., "<key>": value, ...}``)
    metrics.json    the last value of every scalar key, written by ``close(exit_code=0)`` only (a finished run)
    metrics.partial.json  the same while the run is going and after a failed or interrupted one (removed when
                    ``metrics.json`` is written), so a folder never holds a ``metrics.json`` it did not finish
    figures/*.png   every figure and image, named after its key
    tables/*.csv    every table
    wandb/          wandb's own files (offline by default; ``wandb sync <run_dir>/wandb/offline-run-*``)

:meth:`ExperimentLogger.close` finishes the wandb run and then tears wandb's service process down, waiting
for it to exit: only then is every logged row in the offline ``run-<id>.wandb`` file (``finish`` alone may
return while the service still writes, which lost rows on a loaded machine).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dl_utils.files import write_text_atomic

logger = logging.getLogger(__name__)

WandbMode = Literal["offline", "online", "disabled"]
WANDB_MODES = ("offline", "online", "disabled")
METRICS = "metrics.json"
PARTIAL_METRICS = "metrics.partial.json"


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().item()) if value.numel() != 1 else float(value.item())
    if isinstance(value, np.generic | np.ndarray):
        return float(np.asarray(value, dtype=np.float64).mean())
    return float(value)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", key.strip("/")) or "unnamed"


def resolve_wandb_mode(configured: str | None) -> str:
    """``WANDB_MODE`` from the environment wins over YAML; default ``offline``."""
    mode = os.environ.get("WANDB_MODE") or configured or "offline"
    if mode == "dryrun":
        mode = "offline"
    if mode not in WANDB_MODES:
        source = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "wandb.mode"
        raise ValueError(f"{source}: {mode!r} is not one of {', '.join(WANDB_MODES)}")
    return mode


class ExperimentLogger:
    """Logs scalars, figures, images and tables to wandb and to the run folder.

    Args:
        run_dir: the run folder; created if missing.
        mode: wandb mode ('offline' needs no account; 'disabled' writes only the run-folder files).
            ``WANDB_MODE`` in the environment overrides it.
        project, entity, name, group, job_type, tags, notes: passed to ``wandb.init``.
        config: the resolved config, stored as the wandb run's config.
        enabled: False on non-zero distributed ranks: every call is then a no-op.
        resume_id: wandb run id to continue (``experiment.resume``).
    """

    def __init__(
        self,
        *,
        run_dir: str | Path,
        mode: str | None = "offline",
        project: str = "normative_uad",
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
        resume_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.mode = resolve_wandb_mode(mode)
        self._latest: dict[str, float] = {}
        self._wandb_run = None
        self._wandb_dir: str | None = None
        self.wandb_entry: dict[str, str] | None = None  # mode, id and folder of the wandb run (for the manifest)
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for saved in (PARTIAL_METRICS, METRICS):  # resumed run: keep what was logged before
            if (self.run_dir / saved).exists():
                self._latest = {k: (math.nan if v is None else v)
                                for k, v in json.loads((self.run_dir / saved).read_text()).items()}
                break
        if self.mode != "disabled":
            import wandb  # imported here: wandb's import costs ~1 s and is not needed when disabled

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb_run = wandb.init(
                project=project, entity=entity, name=name, group=group, job_type=job_type, tags=tags, notes=notes,
                config=dict(config or {}), dir=str(self.run_dir), mode=self.mode,
                id=resume_id, resume="allow" if resume_id else None,
                settings=wandb.Settings(console="off", disable_git=True, x_disable_stats=True, silent=True),
            )
            self._wandb_run.define_metric("trainer/step")
            for prefix in ("train", "val"):
                self._wandb_run.define_metric(f"{prefix}/*", step_metric="trainer/step")
            self._wandb_dir = str(Path(self._wandb_run.dir).parent)
            self.wandb_entry = {"mode": self.mode, "id": self._wandb_run.id, "dir": self._wandb_dir}

    # ------------------------------------------------------------------------------------------ scalars
    def log_train(self, terms: Mapping[str, Any], *, step: int) -> None:
        """Log training terms as ``train/<term>`` at optimiser step ``step``."""
        self.log_scalars({f"train/{k}": v for k, v in terms.items()}, step=step)

    def log_val(self, metrics: Mapping[str, Any], *, step: int) -> None:
        """Log validation metrics as ``val/<metric>`` at optimiser step ``step``."""
        self.log_scalars({f"val/{k}": v for k, v in metrics.items()}, step=step)

    def log_eval(self, task: str, dataset: str, metrics: Mapping[str, Any]) -> None:
        """Log evaluation results as ``eval/<task>/<dataset>/<metric>`` (also into the wandb summary)."""
        values = {f"eval/{task}/{dataset}/{k}": v for k, v in metrics.items()}
        self.log_scalars(values)
        if self._wandb_run is not None:
            self._wandb_run.summary.update({k: self._latest[k] for k in values if k in self._latest})
        self._write_metrics(PARTIAL_METRICS)

    def log_scalars(self, values: Mapping[str, Any], *, step: int | None = None) -> None:
        """Log scalars under their full keys; ``step`` (trainer step) is recorded as ``trainer/step``."""
        if not self.enabled or not values:
            return
        row: dict[str, float] = {}
        for key, value in values.items():
            if value is None:
                continue
            row[key] = _to_float(value)
        self._latest.update(row)
        record: dict[str, Any] = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in row.items()}}
        with (self.run_dir / "history.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb_run is not None:
            payload: dict[str, Any] = dict(row)
            if step is not None:
                payload["trainer/step"] = step
            self._wandb_run.log(payload)

    # ------------------------------------------------------------------------------------------ media
    def log_figure(self, key: str, figure: Any, *, step: int | None = None) -> Path | None:
        """Save a matplotlib figure as ``figures/<key>.png``, log it to wandb as an image, close it."""
        if not self.enabled:
            _close_figure(figure)
            return None
        path = self.run_dir / "figures" / f"{_file_name(key)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110, bbox_inches="tight")
        _close_figure(figure)
        self._log_media(key, path, step)
        return path

    def log_image(self, key: str, image: Any, *, step: int | None = None) -> Path | None:
        """Save an image ([H,W], [1,H,W], [3,H,W] or [H,W,3], values in [0,1]) as PNG and log it."""
        if not self.enabled:
            return None
        array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        if array.ndim == 3 and array.shape[0] in (1, 3):
            array = np.moveaxis(array, 0, -1)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3):
            raise ValueError(f"log_image({key!r}): expected [H,W], [1,H,W] or [3,H,W], got shape {array.shape}")
        from PIL import Image

        pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        path = self.run_dir / "figures" / f"{_file_name(key)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        self._log_media(key, path, step)
        return path

    def log_table(self, key: str, rows: list[Mapping[str, Any]]) -> Path | None:
        """Write rows (dicts sharing keys) to ``tables/<key>.csv`` and log a wandb table."""
        if not self.enabled or not rows:
            return None
        columns = list(dict.fromkeys(k for row in rows for k in row))
        path = self.run_dir / "tables" / f"{_file_name(key)}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        if self._wandb_run is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            self._wandb_run.log({key: table})
        return path

    def _log_media(self, key: str, path: Path, step: int | None) -> None:
        if self._wandb_run is None:
            return
        import wandb

        payload: dict[str, Any] = {key: wandb.Image(str(path))}
        if step is not None:
            payload["trainer/step"] = step
        self._wandb_run.log(payload)

    # ------------------------------------------------------------------------------------------ run files
    def update_config(self, **entries: Any) -> None:
        """Add entries to the wandb run's config (e.g. the evaluation's backends); the run folder has them in
        ``manifest.json`` (written by the run, :class:`dl_utils.run.Run`), ``config.yaml`` stays the YAML."""
        if self._wandb_run is not None:
            self._wandb_run.config.update(entries, allow_val_change=True)

    def wandb_dir(self) -> str | None:
        """The wandb run's folder (what ``wandb sync`` takes), or None when wandb is disabled."""
        return self._wandb_dir

    @property
    def latest(self) -> dict[str, float]:
        """The last value of every scalar key logged so far."""
        return dict(self._latest)

    def _write_metrics(self, name: str) -> None:
        clean = {k: (v if math.isfinite(v) else None) for k, v in sorted(self._latest.items())}
        write_text_atomic(self.run_dir / name, json.dumps(clean, indent=2))

    def close(self, exit_code: int = 0) -> None:
        """Write the metrics, finish the wandb run and wait until wandb has written everything.

        Args:
            exit_code: 0 for a finished run: ``metrics.json`` is written and ``metrics.partial.json`` removed.
                Anything else (failed, interrupted): only ``metrics.partial.json`` is written.

        wandb's service process is shut down (one per Python process; the next ``wandb.init`` starts a new one),
        so close one logger before opening the next in the same process.
        """
        if not self.enabled:
            return
        try:
            if exit_code == 0:
                self._write_metrics(METRICS)
                (self.run_dir / PARTIAL_METRICS).unlink(missing_ok=True)
            else:
                self._write_metrics(PARTIAL_METRICS)
        finally:
            if self._wandb_run is not None:
                run, self._wandb_run = self._wandb_run, None
                run.finish(exit_code=exit_code)
                _wait_for_wandb(self._wandb_dir, run.id)


def _wait_for_wandb(wandb_dir: str | None, run_id: str) -> None:
    """Tear wandb's service process down and wait for it to exit, so the run file holds every record."""
    import wandb

    wandb.teardown()
    run_file = Path(wandb_dir) / f"run-{run_id}.wandb" if wandb_dir else None
    if run_file is not None and not run_file.is_file():
        logger.warning("wandb finished but %s is missing: the offline run may be incomplete", run_file)


def _close_figure(figure: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
