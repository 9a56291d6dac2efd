"""The prepared device check: every GPU number the performance targets need, in one bounded command.

``python -m tools.gpu_check --out $OUT`` (on a machine with CUDA, about 8 minutes) runs, one step after another, each
in its own process with its own timeout:

1. ``benchmark``: ``tools.benchmark --device cuda`` at the reference size (128x128, UNet (128, 256, 256)): training
   images/s of the plain and the fast path (bf16 autocast, fused Adam, SDPA, channels-last, compiled), AnoDDPM
   (250 steps) and AutoDDPM (200, 50, 5) at batch 1 and 16, and the plain-vs-fast parity of the anomaly maps.
2. ``benchmark_cuda_graphs``: the same inference with ``--compile-mode reduce-overhead`` (CUDA graphs, batch 1).
3. ``quickstart``: ``core/Main.py`` on the quickstart config, on CUDA, with every evaluation task.
4. ``train_<family>``: a short training (``--steps``, 200 by default) of one reference config per method family
   (autoencoder, VAE, Soft-Intro VAE, WGAN-GP, VQ-VAE, MAE, DDPM), evaluation off: every trainer branch on CUDA.
5. ``ddp``: a 2-process NCCL ``torchrun`` of the quickstart's training, when the machine has two GPUs or more.

It writes ``gpu_check.json`` (every step: command, exit status, wall time, the last lines of its output, and the
benchmark's JSON) and ``gpu_check.md`` (a table) to ``--out``, and logs a summary. The first step that fails stops
the check (exit 1) after writing both files, so a broken path is never hidden by the ones after it.

``--smoke`` runs the same steps on the CPU at tiny sizes (the ``_cpu`` configs, a few steps, the benchmark's own
smoke mode); the test suite runs it so that the check cannot rot before a device is lent. How to run it through
the device tool: docs/performance.md, "GPU check".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from data.embedded import SMOKE_COUNTS

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "projects" / "normative_eval" / "configs"
FAMILIES = ("ae", "vae", "si_vae", "fanogan_wgan", "vqvae", "mae", "ddpm")
TAIL_LINES = 15
BUDGET_S = 480  # the whole check: one device-tool call (at most 600 s) with its start-up, rerun room left over
MIN_STEP_S = 20  # a step with less time than this left is not started


@dataclass(frozen=True, kw_only=True)
class Step:
    """One command of the check."""

    name: str
    command: list[str]
    timeout_s: float
    json_out: Path | None = None  # a JSON file the command writes, kept in the result


@dataclass(kw_only=True)
class StepResult:
    name: str
    command: list[str]
    rc: int | None
    wall_s: float
    status: str  # ok, failed, timeout, skipped (after a failure), no_time (the budget ran out)
    tail: list[str] = field(default_factory=list)
    result: Any = None


def plan(*, out: Path, smoke: bool, steps: int, gpus: int, families: Sequence[str] = FAMILIES) -> list[Step]:
    """The check's steps for this machine (``gpus``: CUDA devices seen), in the order they run; one short training
    per method family of ``families``."""
    python = sys.executable
    device = "cpu" if smoke else "cuda"
    runs = out / "runs"
    plan_steps: list[Step] = []
    bench = [python, "-m", "tools.benchmark", "--device", device]
    if smoke:
        bench += ["--smoke"]
    else:
        bench += ["--compile", "--infer-repeats", "2"]
    plan_steps.append(Step(name="benchmark", command=[*bench, "--out", str(out / "benchmark.json")],
                           timeout_s=120 if smoke else 270, json_out=out / "benchmark.json"))
    if not smoke:
        graphs = [*bench, "--compile-mode", "reduce-overhead", "--train-steps", "5",
                  "--out", str(out / "benchmark_cuda_graphs.json")]
        plan_steps.append(Step(name="benchmark_cuda_graphs", command=graphs, timeout_s=180,
                               json_out=out / "benchmark_cuda_graphs.json"))
    main = [python, str(REPO / "core" / "Main.py"), "--log_level", "WARNING"]
    common = ["--set", f"experiment.output_dir={runs}", "--set", "wandb.mode=disabled"]
    if smoke:  # the embedded benchmark at smoke size: every step still runs, on fewer images
        common += [arg for key, value in SMOKE_COUNTS.items()
                   for arg in ("--set", f"data.params.prepare.params.{key}={value}")]
    quick = [*main, "--config_path", str(CONFIG_DIR / "quickstart.yaml"), *common]
    if smoke:
        quick += ["--set", "trainer.params.max_steps=2", "--set", "trainer.params.max_epochs=1",
                  "--set", "downstream_tasks.ahi.enabled=false"]
    plan_steps.append(Step(name="quickstart", command=quick, timeout_s=240 if smoke else 150))
    n_steps = 2 if smoke else steps
    for family in families:
        config = CONFIG_DIR / f"{family}{'_cpu' if smoke else ''}.yaml"
        command = [*main, "--config_path", str(config), *common, "--set", f"trainer.params.max_steps={n_steps}",
                   "--set", "trainer.params.max_epochs=1000", "--set", "downstream_tasks=null"]
        plan_steps.append(Step(name=f"train_{family}", command=command, timeout_s=120 if smoke else 90))
    if gpus >= 2 and not smoke:
        ddp = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "core" / "Main.py"), "--config_path", str(CONFIG_DIR / "quickstart.yaml"), *common,
               "--set", f"trainer.params.max_steps={n_steps}", "--set", "downstream_tasks=null"]
        plan_steps.append(Step(name="ddp", command=ddp, timeout_s=150))
    return plan_steps


def run_step(step: Step, *, env: dict[str, str]) -> StepResult:
    """Run one step; its result whatever happened (a timeout is a failure with status ``timeout``)."""
    logger.info("%s: %s", step.name, " ".join(step.command))
    if step.json_out is not None:  # a file an earlier check left there is never read as this step's result
        step.json_out.unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=step.timeout_s, check=False)
        rc: int | None = done.returncode
        output = (done.stdout or "") + (done.stderr or "")
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as expired:
        rc, status = None, "timeout"
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                         for part in (expired.stdout, expired.stderr))
    wall = time.perf_counter() - start
    result = StepResult(name=step.name, command=step.command, rc=rc, wall_s=round(wall, 1), status=status,
                        tail=output.strip().splitlines()[-TAIL_LINES:])
    if step.json_out is not None and step.json_out.is_file():
        result.result = json.loads(step.json_out.read_text())
    logger.info("%s: %s in %.1f s", step.name, status, wall)
    return result


def device_summary() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if info["gpus"]:
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["bf16"] = torch.cuda.is_bf16_supported()
    return info


def markdown(report: dict[str, Any]) -> str:
    device = report["device"]
    lines = [f"GPU check ({'smoke, CPU' if report['smoke'] else 'CUDA'}): {device.get('gpu_name', 'no GPU')}, "
             f"torch {device['torch']} (CUDA {device['cuda']}), {report['started']}.", "",
             "| step | status | wall s |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['wall_s']} |" for s in report["steps"]]
    for step in report["steps"]:
        if step["name"].startswith("benchmark") and step["result"]:
            lines += ["", f"`{step['name']}` (tools.benchmark's summary):", "",
                      "| measurement | plain | fast | fast/plain |", "|---|---|---|---|"]
            from tools.benchmark import summary_rows

            lines += [f"| {' | '.join(str(c) for c in row)} |" for row in summary_rows(step["result"])]
    return "\n".join(lines) + "\n"


def check(*, out: Path, smoke: bool, steps: int, budget_s: float = BUDGET_S,
          families: Sequence[str] = FAMILIES) -> int:
    """Run the plan within ``budget_s`` (each step's timeout is cut to what is left); write gpu_check.json and
    gpu_check.md under ``out``; 0 when every step passed, 1 when one failed or the budget ran out."""
    out.mkdir(parents=True, exist_ok=True)
    device = device_summary()
    if not smoke and not device["gpus"]:
        logger.error("no CUDA device is visible (torch %s): run with --smoke on a CPU", device["torch"])
        return 2
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    if smoke:
        env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    report: dict[str, Any] = {"smoke": smoke, "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                              "steps": []}
    failed = None
    deadline = time.monotonic() + budget_s
    for step in plan(out=out, smoke=smoke, steps=steps, gpus=device["gpus"], families=families):
        left = deadline - time.monotonic()
        if failed is not None or left < MIN_STEP_S:
            status = "skipped" if failed is not None else "no_time"
            report["steps"].append(asdict(StepResult(name=step.name, command=step.command, rc=None, wall_s=0.0,
                                                     status=status)))
            if failed is None:
                logger.error("%s not started: %.0f s of the %.0f s budget left (--budget-s)", step.name, left,
                             budget_s)
            continue
        if left < step.timeout_s:
            step = replace(step, timeout_s=left)
        result = run_step(step, env=env)
        report["steps"].append(asdict(result))
        if result.status != "ok":
            failed = result
            logger.error("%s %s (exit %s); its last lines:\n%s", step.name, result.status, result.rc,
                         "\n".join(result.tail))
    short = [s["name"] for s in report["steps"] if s["status"] == "no_time"]
    report["wall_s"] = round(sum(s["wall_s"] for s in report["steps"]), 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    logger.info("wrote %s and %s (%.0f s)", out / "gpu_check.json", out / "gpu_check.md", report["wall_s"])
    return 1 if failed is not None or short else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"),
                        help="folder for gpu_check.json/.md (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU at tiny sizes (tests, CI)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help=f"seconds for the whole check (default {BUDGET_S}); later steps are not started")
    parser.add_argument("--steps", type=int, default=200, help="training steps per method family (default 200)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), metavar="FAMILY",
                        help=f"method families to train (default: all of {', '.join(FAMILIES)})")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps: expected a positive integer, got {args.steps}")
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        parser.error(f"--families: {', '.join(unknown)} not among {', '.join(FAMILIES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return check(out=Path(args.out), smoke=args.smoke, steps=args.steps, budget_s=args.budget_s,
                 families=args.families)


if __name__ == "__main__":
    raise SystemExit(main())
