"""``python -m tools.study STUDY.yaml``: run the study's jobs, then write the comparison (see :mod:`tools.study`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from core.Configurator import ConfigError
from tools.study import analysis, evidence, launchers, report, results, runner
from tools.study.plan import Job, LauncherSettings, Study, load_study

logger = logging.getLogger("tools.study")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.study", description=__doc__.split("\n")[0])
    parser.add_argument("study", help="study YAML")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD", help="run only these methods")
    parser.add_argument("--report-only", action="store_true", help="write the comparison of finished runs only")
    parser.add_argument("--readme", default=None, help="a Markdown file whose study block is regenerated")
    parser.add_argument("--no-wandb", action="store_true", help="do not write the study's wandb summary run")
    where = parser.add_argument_group("where the jobs run", "default: the study YAML's launcher: block (else here, one "
                                      "job at a time); these options win over it")
    where.add_argument("--launcher", choices=("local", "slurm"), default=None,
                       help="local: on this machine; slurm: each job a SLURM job (submitit)")
    where.add_argument("--jobs", type=int, default=None, metavar="N",
                       help="local: N jobs at a time, each on its own GPU (if any) and its share of the CPU threads")
    where.add_argument("--partition", default=None, help="slurm: the partition")
    where.add_argument("--time-min", type=int, default=None, metavar="MIN", help="slurm: time limit of one job")
    where.add_argument("--gpus-per-job", type=int, default=None, metavar="N", help="slurm: GPUs of one job")
    where.add_argument("--cpus-per-job", type=int, default=None, metavar="N", help="slurm: CPUs of one job")
    where.add_argument("--mem-gb", type=float, default=None, metavar="GB", help="slurm: memory of one job")
    where.add_argument("--sbatch", action="append", default=[], metavar="OPTION[=VALUE]",
                       help="slurm: a further sbatch option, without dashes (repeatable): --sbatch account=lab")
    parser.add_argument("--wait", action="store_true", help="if another process runs this study, wait for it to end")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.captureWarnings(True)
    try:
        study = load_study(args.study)
        unknown = sorted(set(args.only or ()) - {m.name for m in study.methods})
        if unknown:
            known = [m.name for m in study.methods]
            raise ConfigError(f"--only: {unknown} are not methods of {study.source} ({known})")
        reference = analysis.read_reference(study.reference) if study.reference is not None else None
        jobs = [] if args.report_only else [j for j in study.jobs() if not args.only or j.method.name in args.only]
        launcher = launchers.settings_with(
            study.launcher, kind=args.launcher, jobs=args.jobs, sbatch=args.sbatch,
            slurm={"partition": args.partition, "time_min": args.time_min, "gpus_per_job": args.gpus_per_job,
                   "cpus_per_job": args.cpus_per_job, "mem_gb": args.mem_gb})
        lock = runner.lock_study(study.folder, wait=args.wait)
    except ConfigError as err:
        logger.error("study error: %s", err)
        return 2
    except runner.StudyLocked as err:
        logger.error("study error: %s", err)
        return 1
    except KeyboardInterrupt:
        return 130
    with lock:  # one study process per study folder, released however this one ends
        return run_study(args, study, jobs, launcher, reference)


def run_study(args: argparse.Namespace, study: Study, jobs: list[Job], launcher: LauncherSettings,
              reference: analysis.Reference | None) -> int:
    """Run the jobs and write the comparison; the caller holds the study's lock."""
    try:
        state = runner.read_state(study)
        backend = launchers.backend_for(study, launcher) if jobs else None
        tracked = launchers.run_schedule(study, jobs, state, backend) if backend is not None else []
    except ConfigError as err:
        logger.error("study error: %s", err)
        return 2
    except KeyboardInterrupt:
        return 130
    failed = launchers.failed_keys(tracked)
    finished = results.collect(study, state)
    try:
        boot = results.replicates(finished, count=study.statistics.replicates, seed=study.statistics.seed)
    except results.StudyDataError as err:
        logger.error("study error: %s", err)
        return 2
    found = evidence.build(finished, boot, order=[m.name for m in study.methods], seeds=study.seeds,
                           statistics=study.statistics)
    correlation = analysis.correlations(found)
    agreement = analysis.agreement(found, reference) if reference is not None else None
    paths = report.write_outputs(study, found, finished, correlation, agreement,
                                 readme=Path(args.readme) if args.readme else None,
                                 total_wall_s=results.total_wall(study, state), wandb=not args.no_wandb)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if tracked:
        print(f"\njobs ({launcher.kind}):\n{launchers.summary(study, tracked)}")
    if failed:
        print(f"failed: {', '.join(failed)} (logs in {study.folder / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
