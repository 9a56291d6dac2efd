"""``python -m tools.study --launcher slurm`` on a real single-node SLURM: a two-method study with a dependency (a tiny
AE, and a second entry that evaluates its weights) through the study command. The dependent SLURM job is submitted
with ``afterok`` on its source and starts after the source's run finished, with that run's weights; both entries
come back to ``runs.json``; a second study command submits nothing (both runs are reused).

Needs SLURM and munge (Debian: ``apt-get install slurmctld slurmd slurm-client munge``, or ``STUDY_SLURM_INSTALL=1``
to let the test install them through ``tools/slurm_local/setup.sh --install``) and root, to start the daemons; a
cluster that ``sinfo`` already reaches (``SLURM_CONF``) is used as it is. Skipped, with the reason, where SLURM cannot
be started. About 40 s on 2 cores: two real core/Main.py runs one after the other, each in its own SLURM job.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SETUP = REPO / "tools" / "slurm_local" / "setup.sh"
CONFIGS = REPO / "projects" / "normative_eval" / "configs"
TINY = ["data.params.prepare.params.n_train=32", "data.params.prepare.params.n_val=8",
        "data.params.prepare.params.n_test=8", "data.params.prepare.params.n_per_class=8",
        "data.params.prepare.params.size=64", "trainer.params.max_epochs=1", "wandb.mode=disabled",
        *(f"downstream_tasks.{task}.enabled=false" for task in (
            "segmentation", "healthy_fpr", "subject_detection", "subject_segmentation", "score_calibration",
            "p_values", "localization", "rqi", "ahi", "caci"))]


def _reachable() -> bool:
    if shutil.which("sinfo") is None:
        return False
    done = subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, timeout=30,
                          check=False)
    return done.returncode == 0 and done.stdout.strip().startswith(("idle", "mixed", "alloc"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A reachable SLURM: the one SLURM_CONF names, else one started here (stopped afterwards)."""
    if _reachable():
        yield os.environ.get("SLURM_CONF")
        return
    install = os.environ.get("STUDY_SLURM_INSTALL") == "1"
    if shutil.which("slurmctld") is None and not install:
        pytest.skip("SLURM is not installed (apt-get install slurmctld slurmd slurm-client munge, or set "
                    "STUDY_SLURM_INSTALL=1 to let this test install it)")
    if os.geteuid() != 0:
        pytest.skip("starting a local SLURM needs root (tools/slurm_local/setup.sh)")
    folder = tmp_path_factory.mktemp("slurm_local")
    done = subprocess.run(["bash", str(SETUP), "--dir", str(folder), *(["--install"] if install else [])],
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        pytest.skip(f"the local SLURM did not start: {done.stderr.strip() or done.stdout.strip()}")
    try:
        yield str(folder / "slurm.conf")
    finally:
        subprocess.run(["bash", str(SETUP), "--stop", "--dir", str(folder)], capture_output=True, timeout=60,
                       check=False)


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_a_dependent_slurm_job_starts_after_its_source_with_its_weights(cluster, tmp_path, monkeypatch):
    from tools.study import __main__ as cli

    if cluster:
        monkeypatch.setenv("SLURM_CONF", cluster)
    for name, value in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("WANDB_MODE", "disabled")):
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)  # the jobs run where the study command runs (the embedded benchmark's cache)
    sets = ", ".join(TINY)
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nexperiment: exp\noutput_dir: {tmp_path / 'runs'}\nseeds: [1]\nreference: null\n"
                     f"statistics: {{replicates: 40}}\noverrides: [{sets}]\n"
                     "launcher: {kind: slurm, slurm: {time_min: 10, signal_delay_s: 30, poll_s: 1}}\n"
                     f"methods:\n  - {{config: {CONFIGS / 'ae_cpu.yaml'}}}\n"
                     f"  - {{config: {CONFIGS / 'ae_cpu.yaml'}, name: ae_again, weights_from: ae_cpu}}\n")
    assert cli.main([str(study), "--no-wandb"]) == 0
    folder = tmp_path / "runs" / "exp" / "_studies" / "s"
    ids = json.loads((folder / "slurm" / "jobs.json").read_text())
    assert set(ids) == {"ae_cpu/seed1", "ae_again/seed1"}
    script = (folder / "slurm" / ids["ae_again/seed1"] / f"{ids['ae_again/seed1']}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{ids['ae_cpu/seed1']}" in script.splitlines()
    (source,) = sorted((tmp_path / "runs" / "exp" / "ae_cpu").iterdir())
    (dependent,) = sorted((tmp_path / "runs" / "exp" / "ae_again").iterdir())
    finished = next(e["time"] for e in _manifest(source)["events"] if e["event"] == "finished")
    assert _manifest(dependent)["started"] >= finished and _manifest(dependent)["status"] == "finished"
    assert _manifest(dependent)["task"] == "evaluate"
    assert f"experiment.weights={source / 'checkpoints' / 'best.pt'}" in (dependent / "config.yaml").read_text()
    state = json.loads((folder / "runs.json").read_text())
    assert state["ae_cpu/seed1"]["run"] == str(source) and state["ae_again/seed1"]["run"] == str(dependent)
    assert state["ae_again/seed1"]["where"].startswith(f"SLURM job {ids['ae_again/seed1']} on ")
    # again: both runs are found finished, nothing is submitted
    assert cli.main([str(study), "--no-wandb"]) == 0
    assert json.loads((folder / "slurm" / "jobs.json").read_text()) == ids
    assert len(list((tmp_path / "runs" / "exp" / "ae_cpu").iterdir())) == 1
