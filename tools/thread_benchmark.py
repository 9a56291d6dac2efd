"""CPU thread policies under contention: training and inference images/s of ``_cpu`` configs, idle and busy.

Why: with torch's default of one intra-op thread per core, a CPU run slows down by an order of magnitude as soon
as another process is runnable on one of those cores (see :mod:`dl_utils.threads`). This script measures, for
each candidate policy, the throughput of real configs (built by the project's builder, trained by the project's
trainer) with 0, 1, 2, ... busy processes beside them, and picks the default that ``experiment.threads: auto``
uses by the rule of docs/performance.md ("CPU threads"):

* within :data:`IDLE_TOLERANCE` of the best policy when the machine is idle, and
* never below the one-thread policy under contention (within :data:`NOISE_TOLERANCE`, the run-to-run spread of
  one measurement on this machine).

Policies (each measured in a fresh process, all configs in turn there, because OpenMP reads its wait policy
once, when torch loads it):

* ``torch``: torch's default thread count (one per physical core), OpenMP's default wait policy;
* ``one``: one thread;
* ``passive``: torch's default count with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is imported);
* ``free``: one thread per core that was idle when the process started (:func:`dl_utils.threads.free_cores`);
* ``free-passive``: ``free`` with ``OMP_WAIT_POLICY=PASSIVE``.

A busy process is a single-threaded Python busy loop (the same load as a second training process on one core,
a browser tab or a CI neighbour). The 1-minute load average is read at the end of every measurement and
reported beside it; the machine's load before the first measurement is recorded too (run it on an otherwise
idle machine: the numbers are only comparable to each other).

CLI::

    python -m tools.thread_benchmark [--configs vae_cpu,ddpm_cpu] [--busy 0,1,2] [--seconds 4]
        [--policies torch,one,passive,free] [--out runs/thread_benchmark]

It writes ``thread_benchmark.json`` and ``thread_benchmark.md`` under ``--out``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG_DIR = Path("projects/normative_eval/configs")
IDLE_TOLERANCE = 0.10
NOISE_TOLERANCE = 0.05
INFER_IMAGES = 4  # inference batch: a diffusion chain per image is slow on a CPU


@dataclass(frozen=True)
class Policy:
    """A candidate policy: the ``experiment.threads`` setting and the OpenMP wait policy (None: its default)."""

    name: str
    setting: str | int
    wait_policy: str | None = None


POLICIES = {p.name: p for p in (Policy("torch", "torch"), Policy("one", 1), Policy("passive", "torch", "PASSIVE"),
                                Policy("free", "free"), Policy("free-passive", "free", "PASSIVE"))}
DEFAULT_POLICIES = ("torch", "one", "passive", "free")


def worker_environment(policy: Policy) -> dict[str, str]:
    """The environment of a measurement process: the parent's, without any thread or wait setting but ``policy``'s."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
    if policy.wait_policy is not None:
        env["OMP_WAIT_POLICY"] = policy.wait_policy
    env.setdefault("WANDB_MODE", "disabled")
    return env


def measure(config_path: Path, setting: str | int, *, seconds: float, warmup: int = 1) -> dict[str, Any]:
    """Training and inference images/s of ``config_path``'s model under thread ``setting`` (in this process).

    Training runs the config's own trainer (``Trainer.training_step``, so GAN-style methods use their own hook) on
    the first training batch, repeated; inference runs ``model.get_anomaly`` on the same batch in eval mode. Each
    phase runs ``warmup`` calls, then as many as fit in ``seconds`` (at least two); inference takes the batch's
    first :data:`INFER_IMAGES` images.
    """
    import tempfile

    import torch

    from core.Configurator import allow_imports, build, load_config
    from core.Main import build_objects
    from core.Trainer import Trainer
    from dl_utils import threads
    from dl_utils.experiment_logger import ExperimentLogger
    from dl_utils.run import Run

    start = time.perf_counter()
    record = threads.apply_policy(setting)
    config = load_config(str(config_path), ["data.params.cache=none"])  # decode only the batch it uses
    allow_imports(config.get("allow_imports"))
    torch.manual_seed(0)
    data, model = build_objects(config)
    batch = next(iter(data.train_dataloader()))
    n_images = int(batch.image.shape[0])

    def timed(step: Any, images: int) -> float:
        for _ in range(warmup):
            step()
        calls, start = 0, time.perf_counter()
        while calls < 2 or time.perf_counter() - start < seconds:
            step()
            calls += 1
        return calls * images / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        quiet = ExperimentLogger(run_dir=tmp, mode="disabled", enabled=False)
        run = Run(run_dir=Path(tmp), device=torch.device("cpu"), seed=0, config=config, logger=quiet)
        trainer = build(config["trainer"], "trainer", base=Trainer, model=model, data=data, run=run)
        model.train()
        built_s = time.perf_counter() - start
        train = timed(lambda: trainer.training_step(batch), n_images)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    images = batch.image[:INFER_IMAGES]
    with torch.no_grad():
        infer = timed(lambda: model.get_anomaly(images, generator=generator), int(images.shape[0]))
    return {"train_images_per_s": train, "infer_images_per_s": infer, "batch_size": n_images,
            "infer_batch_size": int(images.shape[0]), "startup_s": built_s,
            "threads": record["threads"], "omp_wait_policy": record["omp_wait_policy"],
            "free_cores": record.get("free_cores")}


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def start_busy(n: int) -> list[subprocess.Popen]:
    """``n`` single-threaded busy-loop processes (stopped by :func:`stop_busy`)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(processes: Sequence[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
        process.wait()


def run_worker(configs: Sequence[str], policy: Policy, *, seconds: float, timeout: float) -> list[dict[str, Any]]:
    """The measurements of ``configs`` in one fresh process (its own OpenMP start-up) under ``policy``; raises
    RuntimeError naming what failed."""
    paths = ",".join(str(CONFIG_DIR / f"{config}.yaml") for config in configs)
    command = [sys.executable, "-m", "tools.thread_benchmark", "--worker", paths, "--setting", str(policy.setting),
               "--seconds", str(seconds)]
    done = subprocess.run(command, env=worker_environment(policy), capture_output=True, text=True, timeout=timeout,
                          check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {', '.join(configs)} with policy {policy.name} failed (exit "
                           f"{done.returncode}): {done.stderr.strip().splitlines()[-1:] or 'no output'}")
    return json.loads(lines[-1])


def benchmark(*, configs: Sequence[str], policies: Sequence[str], busy_levels: Sequence[int], seconds: float,
              settle_s: float = 2.0) -> dict[str, Any]:
    """Every (busy level, config, policy) measurement; policies alternate within a busy level, so drift spreads."""
    rows: list[dict[str, Any]] = []
    result: dict[str, Any] = {"load_before": load_average(), "cores": os.cpu_count(), "seconds": seconds,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rows": rows}
    for busy in busy_levels:
        processes = start_busy(busy)
        try:
            time.sleep(settle_s)
            for name in policies:
                timeout = 60 * seconds * len(configs) + 300
                entries = run_worker(configs, POLICIES[name], seconds=seconds, timeout=timeout)
                load = load_average()
                for config, entry in zip(configs, entries, strict=True):
                    entry.update(config=config, policy=name, busy=busy, load_1min=load)
                    logger.info("%s, %s, %d busy: train %.1f, inference %.1f images/s (%d threads, load %.2f)",
                                config, name, busy, entry["train_images_per_s"], entry["infer_images_per_s"],
                                entry["threads"], entry["load_1min"])
                    rows.append(entry)
        finally:
            stop_busy(processes)
    result["choice"] = choose_policy(rows)
    return result


def _throughputs(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, float]]:
    """``(config, phase, busy) -> {policy: images/s}``."""
    table: dict[tuple[str, str, int], dict[str, float]] = {}
    for row in rows:
        for phase in ("train", "infer"):
            table.setdefault((row["config"], phase, row["busy"]), {})[row["policy"]] = row[f"{phase}_images_per_s"]
    return table


def choose_policy(rows: Sequence[dict[str, Any]], *, idle_tolerance: float = IDLE_TOLERANCE,
                  noise_tolerance: float = NOISE_TOLERANCE) -> dict[str, Any]:
    """The policies that pass the rule (module docstring), each with why the others fail; the first passing one
    in the order ``passive, free-passive, free, torch, one`` (simplest first) is the ``choice``."""
    table = _throughputs(rows)
    names = sorted({row["policy"] for row in rows})
    failures: dict[str, list[str]] = {name: [] for name in names}
    for (config, phase, busy), values in table.items():
        for name, value in values.items():
            if busy == 0 and value < (1 - idle_tolerance) * max(values.values()):
                failures[name].append(f"{config} {phase} idle: {value:.1f} < 90% of best {max(values.values()):.1f}")
            if busy > 0 and "one" in values and value < (1 - noise_tolerance) * values["one"]:
                failures[name].append(f"{config} {phase} {busy} busy: {value:.1f} < one thread's {values['one']:.1f}")
    order = [n for n in ("passive", "free-passive", "free", "torch", "one") if n in names]
    passing = [n for n in order if not failures[n]]
    return {"choice": passing[0] if passing else None, "passing": passing, "failures": failures,
            "idle_tolerance": idle_tolerance, "noise_tolerance": noise_tolerance}


def markdown(result: dict[str, Any]) -> str:
    """The measurement as a Markdown table (images/s, the load average in brackets) and the choice."""
    rows = result["rows"]
    policies = list(dict.fromkeys(row["policy"] for row in rows))
    lines = [f"Measured {result['started']} on {result['cores']} cores, {result['seconds']} s per phase; load "
             f"before the first measurement {result['load_before']:.2f}. Images/s (1-minute load average at the "
             "end of the measurement).", "",
             "| config | phase | busy processes | " + " | ".join(policies) + " |",
             "|---|---|---|" + "---|" * len(policies)]
    index = {(r["config"], r["busy"], r["policy"]): r for r in rows}
    configs = list(dict.fromkeys(row["config"] for row in rows))
    busy_levels = list(dict.fromkeys(row["busy"] for row in rows))
    for config in configs:
        for phase in ("train", "infer"):
            for busy in busy_levels:
                cells = []
                for policy in policies:
                    row = index.get((config, busy, policy))
                    cells.append("" if row is None else
                                 f"{row[f'{phase}_images_per_s']:.1f} ({row['load_1min']:.1f}; {row['threads']} th)")
                lines.append(f"| {config} | {phase} | {busy} | " + " | ".join(cells) + " |")
    choice = result["choice"]
    lines += ["", f"Passing the rule: {', '.join(choice['passing']) or 'none'}; chosen: {choice['choice']}."]
    for name, why in choice["failures"].items():
        if why:
            lines.append(f"- {name} fails: " + "; ".join(why))
    return "\n".join(lines) + "\n"


def _setting(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="vae_cpu,ddpm_cpu", help="config names under " + str(CONFIG_DIR))
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help=f"of {', '.join(POLICIES)}")
    parser.add_argument("--busy", default="0,1,2", help="numbers of busy processes beside the measurement")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per phase and measurement")
    parser.add_argument("--out", default="runs/thread_benchmark")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--setting", default="torch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        setting = _setting(args.setting)
        print(json.dumps([measure(Path(path), setting, seconds=args.seconds) for path in args.worker.split(",")]))
        return 0
    policies = args.policies.split(",")
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        parser.error(f"--policies: unknown {', '.join(unknown)} (choices: {', '.join(POLICIES)})")
    configs = args.configs.split(",")
    missing = [c for c in configs if not (CONFIG_DIR / f"{c}.yaml").is_file()]
    if missing:
        parser.error(f"--configs: no {', '.join(str(CONFIG_DIR / f'{c}.yaml') for c in missing)}")
    result = benchmark(configs=configs, policies=policies, busy_levels=[int(b) for b in args.busy.split(",")],
                       seconds=args.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "thread_benchmark.json").write_text(json.dumps(result, indent=2))
    (out / "thread_benchmark.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'thread_benchmark.json'} and {out / 'thread_benchmark.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
