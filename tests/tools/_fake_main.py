"""A stand-in for ``core/Main.py`` in launcher tests: it takes the study's command line, leaves a run folder as Main
does (``config.yaml`` with the ``--set`` overrides, ``manifest.json`` with status and seed, ``checkpoints/latest.pt``)
and records each call in ``<run>/calls.jsonl`` (pid, arguments, start and end times), in a fraction of a second and
without torch.

Knobs, as ``--set`` overrides of the study's methods: ``fake.seconds`` (how long the run trains, default 0),
``fake.resume_seconds`` (how long a resumed run trains), ``fake.fail`` (exit 1 without finishing). SIGTERM ends the
run as interrupted (exit 143), as Main does.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    values = dict(s.split("=", 1) for s in sets)
    resume = values.get("experiment.resume")
    if resume:
        run = Path(resume)
    else:
        parent = Path(values["experiment.output_dir"]) / values["experiment.name"] / values["name"]
        parent.mkdir(parents=True, exist_ok=True)
        run = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.yaml").write_text(json.dumps({"overrides": sets}))
    seed = int(values["experiment.seed"]) if "experiment.seed" in values else None
    manifest = run / "manifest.json"
    events = json.loads(manifest.read_text())["events"] if manifest.is_file() else []

    def status(state: str) -> None:
        events.append(state)
        manifest.write_text(json.dumps({"status": state, "seed": seed, "events": events}))

    call = {"pid": os.getpid(), "run": str(run), "argv": argv, "env_threads": os.environ.get("OMP_NUM_THREADS"),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": time.time(),
            "usr2_ignored": signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN}

    def record(outcome: str) -> None:
        with (run / "calls.jsonl").open("a") as f:
            f.write(json.dumps({**call, "end": time.time(), "outcome": outcome}) + "\n")

    def interrupted(signum: int, _frame: object) -> None:
        status("interrupted")
        record("interrupted")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    status("resumed" if resume else "running")
    (run / "checkpoints" / "latest.pt").write_bytes(b"weights")
    end = time.monotonic() + float(values.get("fake.resume_seconds" if resume else "fake.seconds", 0))
    while time.monotonic() < end:
        time.sleep(0.05)
    if values.get("fake.fail"):
        status("failed")
        record("failed")
        return 1
    (run / "metrics.json").write_text("{}")
    status("finished")
    record("finished")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
