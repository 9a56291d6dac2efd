"""The folder a prediction writes into (``predict.output_dir``), and the record of what it wrote there.

A folder that already holds anything is refused before a run folder exists, unless ``predict.overwrite: true``:
then the files an earlier prediction recorded in the folder's ``predict_outputs.txt`` are removed before the
new prediction writes, so no stale ``skipped.csv`` or map of an earlier prediction stands beside the new
results; every other file stays (listed in a warning) and is replaced only where a new output has its name.
Each prediction appends the name of every file it writes to that record as soon as the file is complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from core.Configurator import ConfigError

logger = logging.getLogger(__name__)

RECORD = "predict_outputs.txt"
_HEADER = "# files written by the prediction run "


def _listed(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def check_output_folder(path: Path, *, overwrite: bool, inputs: Iterable[Path]) -> None:
    """Refuse ``path`` as ``predict.output_dir`` before anything is written.

    Args:
        path: the resolved ``predict.output_dir`` (it need not exist).
        overwrite: ``predict.overwrite``.
        inputs: the input files, none of which may lie inside a folder that is overwritten.

    Raises:
        ConfigError: naming ``predict.output_dir``: a file, a folder that holds entries without ``overwrite``
            (listing them), or an overwritten folder that holds an input.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"predict.output_dir: {path} is a file, not a folder")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if not held:
        return
    if not overwrite:
        raise ConfigError(f"predict.output_dir: {path} already holds {len(held)} entries ({_listed(held)}); predict "
                          "into a new or empty folder, or set predict.overwrite: true to replace an earlier "
                          "prediction's outputs there")
    folder = path.resolve()
    inside = [p for p in inputs if p.resolve().is_relative_to(folder)]
    if inside:
        raise ConfigError(f"predict.output_dir: {path} holds the input {inside[0]}; write the outputs to a folder "
                          "of their own")


class OutputFolder:
    """The output folder of one prediction: clears an earlier prediction's outputs, records this one's.

    Args:
        path: the folder (created if missing); checked with :func:`check_output_folder` when the user chose it.
        run_dir: this prediction's run folder, named in the record.
    """

    def __init__(self, path: Path, *, run_dir: Path) -> None:
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        removed = [name for name in self._earlier_outputs() if (path / name).is_file()]
        for name in removed:
            (path / name).unlink()
        if removed:
            logger.info("predict.overwrite: removed %d outputs of an earlier prediction from %s", len(removed), path)
        stay = sorted(p.name for p in path.iterdir() if p.name != RECORD)
        if stay:
            logger.warning("predict.overwrite: %d entries of %s are not outputs of an earlier prediction and stay "
                           "(%s); an output of the same name replaces one", len(stay), path, _listed(stay))
        (path / RECORD).write_text(f"{_HEADER}{run_dir}\n", encoding="utf-8")

    def _earlier_outputs(self) -> list[str]:
        """The file names an earlier prediction recorded here (plain names inside the folder only)."""
        record = self.path / RECORD
        if not record.is_file():
            return []
        names = [line.strip() for line in record.read_text(encoding="utf-8").splitlines()]
        return [n for n in names if n and not n.startswith("#") and os.sep not in n and n not in (".", "..")]

    def record(self, files: Iterable[Path]) -> None:
        """Append the names of files just written (they are outputs of this prediction from now on)."""
        names = [Path(f).name for f in files]
        if names:
            with (self.path / RECORD).open("a", encoding="utf-8") as f:
                f.write("".join(f"{n}\n" for n in names))
