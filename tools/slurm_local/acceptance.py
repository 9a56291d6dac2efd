"""The cluster launcher's acceptance on this machine.

``tools/slurm_local/tiny_study.yaml`` (three tiny methods, AutoDDPM evaluating the DDPM's weights) runs here
(``--launcher local``) and on a local single-node SLURM (``--launcher slurm``), each into its own folder, both at one
CPU thread. The script then checks that every SLURM job finished, that AutoDDPM's run started after the DDPM's run
finished, and that the two comparisons (``study.csv``) agree number for number apart from the cost columns (wall and
training time, load, seconds per image), and prints the SLURM job ids with their states.

    bash tools/slurm_local/setup.sh [--install]         # once, as root (or let this script start it)
    python tools/slurm_local/acceptance.py [--out /tmp/tiny_cluster]

Exit status 0 when every check holds. Uses the cluster that ``sinfo`` reaches (``SLURM_CONF``), else starts one with
``setup.sh --dir <out>/slurm_local``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
STUDY = Path(__file__).with_name("tiny_study.yaml")
COST = ("wall s", "train s", "load avg", "test s / image")


def cluster_up(env: dict[str, str]) -> bool:
    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=env, capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip().startswith(("idle", "mixed", "alloc"))


def study_copy(out: Path, kind: str) -> Path:
    """The tiny study with its runs under ``out/<kind>`` and its config paths absolute."""
    raw = yaml.safe_load(STUDY.read_text())
    raw["output_dir"] = str(out / kind)
    for method in raw["methods"]:
        method["config"] = str((STUDY.parent / method["config"]).resolve())
    path = out / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_study(path: Path, launcher: str, env: dict[str, str], log: Path) -> int:
    with log.open("w") as f:
        return subprocess.run([sys.executable, "-m", "tools.study", str(path), "--launcher", launcher, "--no-wandb"],
                              cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode


def table(out: Path, kind: str) -> dict[str, dict[str, str]]:
    rows = csv.DictReader((out / kind / "tiny_cluster" / "_studies" / "tiny_cluster" / "study.csv").open())
    return {row["method"]: {k: v for k, v in row.items() if k not in COST} for row in rows}


def manifest(out: Path, kind: str, method: str) -> dict:
    (run,) = sorted((out / kind / "tiny_cluster" / method).glob("*/manifest.json"))
    return json.loads(run.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/tiny_cluster"), help="where both studies go")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    if not cluster_up(env):
        subprocess.run(["bash", str(REPO / "tools" / "slurm_local" / "setup.sh"), "--dir", str(out / "slurm_local")],
                       check=True)
        env["SLURM_CONF"] = str(out / "slurm_local" / "slurm.conf")
    codes = {kind: run_study(study_copy(out, kind), kind, env, out / f"{kind}.log") for kind in ("local", "slurm")}
    print(f"exit codes: {codes} (outputs in {out / 'local.log'}, {out / 'slurm.log'})")
    jobs = json.loads((out / "slurm" / "tiny_cluster" / "_studies" / "tiny_cluster" / "slurm" / "jobs.json")
                      .read_text())
    listed = subprocess.run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(jobs.values())}",
                             "--format=%i|%T|%S|%e|%j"], env=env, capture_output=True, text=True, check=False).stdout
    print("SLURM jobs (id | state | start | end | name):\n" + listed.strip())
    source, dependent = manifest(out, "slurm", "ddpm_cpu"), manifest(out, "slurm", "autoddpm_cpu")
    ended = next(e["time"] for e in source["events"] if e["event"] == "finished")
    ordered = dependent["started"] >= ended
    print(f"ddpm_cpu's run finished at {ended}, autoddpm_cpu's started at {dependent['started']}: "
          f"{'after' if ordered else 'BEFORE'} it")
    local, slurm = table(out, "local"), table(out, "slurm")
    differ = [(m, k, local.get(m, {}).get(k), v) for m, row in slurm.items() for k, v in row.items()
              if local.get(m, {}).get(k) != v]
    compared = sum(len(row) for row in slurm.values())
    print(f"study.csv: {compared} values of {len(slurm)} methods compared (cost columns aside), {len(differ)} differ"
          + "".join(f"\n  {m} {k}: local {a} slurm {b}" for m, k, a, b in differ[:20]))
    ok = codes == {"local": 0, "slurm": 0} and ordered and not differ and set(local) == set(slurm) == {
        "ae_cpu", "ddpm_cpu", "autoddpm_cpu"}
    print("acceptance: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
