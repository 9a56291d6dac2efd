"""Tiny PNG datasets, tiny configs and a runner for ``core/Main.py`` subprocesses.

Every case of the suite is a function registered with :func:`case`; the session fixture ``outcomes`` runs the
selected cases in a small thread pool (each case runs its own subprocesses, so they overlap their start-up
time), and each test waits for its case. ``RELIABILITY_JOBS`` sets the pool size (default 3).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "core" / "Main.py"
CASES: dict[str, Callable[[Path], None]] = {}
TIMEOUT_S = 240


def case(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    """Register a case: ``fn(tmp)`` sets up, runs the subprocesses and asserts (in a pool thread)."""
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


@pytest.fixture(scope="session")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Future]:
    selected = [item.callspec.params["name"] for item in request.session.items
                if hasattr(item, "callspec") and "name" in item.callspec.params
                and item.module.__name__.endswith("test_reliability")]
    _SHARED["root"] = tmp_path_factory.mktemp("shared_run")
    pool = ThreadPoolExecutor(max_workers=int(os.environ.get("RELIABILITY_JOBS", "3")))
    futures = {name: pool.submit(CASES[name], tmp_path_factory.mktemp(name)) for name in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ data
def write_csv(path: Path, files: list[Path | str]) -> Path:
    path.write_text("filename\n" + "".join(f"{f}\n" for f in files), encoding="utf-8")
    return path


def png(path: Path, seed: int, size: int = 32) -> Path:
    """A smooth random grey image (uint8 PNG)."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(size), np.arange(size)).astype(np.float64)
    pixels = (ramp / ramp.max() * 200 + rng.uniform(0, 55, (size, size))).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def make_data(root: Path, *, n_train: int = 8, n_val: int = 4, size: int = 32) -> dict[str, Path]:
    """``root/data``: train/val PNGs, their CSVs and row-aligned brain-mask PNGs and CSVs."""
    folder = root / "data"
    folder.mkdir(parents=True)
    out: dict[str, Path] = {"folder": folder}
    for split, n in (("train", n_train), ("val", n_val)):
        images = [png(folder / f"{split}{i}.png", seed=i + (100 if split == "val" else 0), size=size)
                  for i in range(n)]
        masks = []
        for i in range(n):
            mask = np.zeros((size, size), np.uint8)
            mask[4:-4, 4:-4] = 255
            Image.fromarray(mask).save(folder / f"{split}_mask{i}.png")
            masks.append(folder / f"{split}_mask{i}.png")
        out[split] = write_csv(folder / f"{split}.csv", images)
        out[f"{split}_masks"] = write_csv(folder / f"{split}_masks.csv", masks)
    return out


def base_config(root: Path, data: dict[str, Path]) -> dict[str, Any]:
    """A config that trains the tiny AE for one epoch (2 steps) on 32x32 PNGs on the CPU, wandb off."""
    return {
        "name": "tiny",
        "experiment": {"name": "rel", "task": "train", "seed": 0, "device": "cpu",
                       "output_dir": str(root / "runs")},
        "wandb": {"mode": "disabled"},
        "data": {"module_name": "core.data_module", "class_name": "DataModule", "params": {
            "target_size": [32, 32], "batch_size": 4, "eval_batch_size": 4, "num_workers": 0, "cache": "none",
            "train": {"images": [str(data["train"])]}, "val": {"images": [str(data["val"])]}}},
        "model": {"module_name": "model_zoo.ae", "class_name": "AutoEncoder",
                  "params": {"channels": [4, 8], "latent_channels": 8}},
        "trainer": {"module_name": "core.Trainer", "class_name": "Trainer", "params": {
            "max_epochs": 1, "log_interval": 1, "progress": False,
            "optimizer": {"module_name": "torch.optim", "class_name": "Adam", "params": {"lr": 0.001}}}},
    }


def write_config(path: Path, config: dict[str, Any], **changes: Any) -> Path:
    """Dump ``config`` with ``changes`` applied (keys are dotted YAML paths) to ``path``."""
    config = copy.deepcopy(config)
    for dotted, value in changes.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Result:
    rc: int
    stdout: str
    stderr: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if re.search(r"\bERROR\b", line)]

    def one_error(self) -> str:
        """The single ERROR line (asserting there is exactly one and no traceback)."""
        assert "Traceback" not in self.stderr, self.stderr
        assert len(self.errors) == 1, self.stderr
        return self.errors[0]


def env(**extra: str) -> dict[str, str]:
    """The subprocess environment: one thread, wandb disabled; an ``extra`` value ``""`` removes the variable."""
    merged = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "MPLBACKEND": "Agg", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", **extra}
    return {k: v for k, v in merged.items() if not (k in extra and v == "")}


def main_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, str(MAIN), "--config_path", str(config), *args]


def run(cmd: list[str], cwd: Path, **extra_env: str) -> Result:
    done = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
    return Result(done.returncode, done.stdout, done.stderr)


def run_main(config: Path, *args: str, cwd: Path | None = None, **extra_env: str) -> Result:
    return run(main_cmd(config, *args), cwd or config.parent, **extra_env)


def start_main(config: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(main_cmd(config, *args), cwd=config.parent, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ run folders
def run_dirs(root: Path) -> list[Path]:
    base = root / "runs"
    return sorted(p for p in base.glob("*/*/*") if p.is_dir()) if base.is_dir() else []


def the_run(root: Path) -> Path:
    dirs = run_dirs(root)
    assert len(dirs) == 1, dirs
    return dirs[0]


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def history_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    return [row["step"] for row in rows if "train/loss" in row]


def faults_cmd(*fault_args: str) -> list[str]:
    """``python -m tests.reliability._faults <fault_args> --`` (append the ``core/Main.py`` arguments)."""
    return [sys.executable, "-m", "tests.reliability._faults", *fault_args, "--"]


def interrupt_after_first_checkpoint(config: Path, **extra_env: str) -> Result:
    """Train ``config`` until its first ``latest.pt`` is written, then SIGINT (exit 130: an interrupted run)."""
    return run([*faults_cmd("--interrupt-after-checkpoint", "latest.pt"), "--config_path", str(config)],
               config.parent, **extra_env)


_SHARED: dict[str, Any] = {}
_SHARED_LOCK = threading.Lock()


def _shared_copy(kind: str, tmp: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Copy the shared run ``kind`` (made once per session) into ``tmp/runs``: (run folder, config file, config)."""
    with _SHARED_LOCK:
        if kind not in _SHARED:
            root = _SHARED["root"] / kind
            root.mkdir()
            if "data" not in _SHARED:
                _SHARED["data"] = make_data(_SHARED["root"])
            data = _SHARED["data"]
            config = base_config(root, data)
            if kind == "finished":
                result = run_main(write_config(root / "train.yaml", config))
                assert result.rc == 0, result.stderr
            else:
                config["trainer"]["params"]["max_epochs"] = 2
                result = interrupt_after_first_checkpoint(write_config(root / "train.yaml", config))
                assert result.rc == 130, result.stderr
            _SHARED[kind] = (the_run(root), config)
    source, config = _SHARED[kind]
    run_dir = tmp / "runs" / source.relative_to(source.parents[2])
    shutil.copytree(source, run_dir)
    config = copy.deepcopy(config)
    config["experiment"]["output_dir"] = str(tmp / "runs")
    return run_dir, write_config(tmp / "train.yaml", config), config


def trained_run(tmp: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A finished run of the tiny config, copied into ``tmp/runs`` (the training runs once per session).

    Returns:
        (the copy's run folder, a config file whose ``output_dir`` is ``tmp/runs``, that config). The data
        is shared by every case: do not modify it (make your own with :func:`make_data`).
    """
    return _shared_copy("finished", tmp)


def interrupted_run(tmp: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A run of the tiny config with ``max_epochs: 2``, interrupted by SIGINT right after its first checkpoint
    (``latest.pt`` at the end of epoch 1, step 2), copied into ``tmp/runs`` like :func:`trained_run`."""
    return _shared_copy("interrupted", tmp)
