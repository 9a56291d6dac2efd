"""The study YAML and what it asks for: methods, seeds, statistics settings, and the jobs (one per method and seed).

Also where a job's runs live and which of them counts: run folders are read, never written, here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.Configurator import ConfigError, check_keys, load_config, read_yaml, to_dataclass
from dl_utils.run import read_manifest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCE = REPO / "docs" / "reference_results.csv"
STUDY_KEYS = ("name", "experiment", "output_dir", "overrides", "seeds", "statistics", "reference", "launcher",
              "methods")
PLACING_KEYS = ("experiment.name", "experiment.output_dir", "name", "experiment.resume", "experiment.task",
                "experiment.weights")


@dataclass(frozen=True, kw_only=True)
class Stage1:
    """A second stage's dependency: ``key`` (a config key path) receives ``method``'s ``checkpoints/<checkpoint>``."""

    method: str
    key: str
    checkpoint: str = "latest.pt"


@dataclass(frozen=True, kw_only=True)
class Method:
    """One entry of ``methods:``: a config, its extra overrides, and optionally another method's weights."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    weights_from: str | None = None
    stage1: Stage1 | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """The methods whose finished run (of the same seed) this one starts from."""
        return tuple(m for m in (self.weights_from, self.stage1.method if self.stage1 else None) if m)


@dataclass(frozen=True, kw_only=True)
class Statistics:
    """The ``statistics:`` block: how intervals, comparisons and correlations are computed.

    Attributes:
        replicates: bootstrap resamples of the images (the same for every method and seed).
        seed: seed of the bootstrap draws and of the correlations' resamples and permutations.
        level: coverage of every interval.
        alpha: a method is "not distinguishable from the best" of a column when its paired p-value is >= alpha.
        permutations: orderings for a permutation p-value (all n! when n! is at most this, else this many at random).
    """

    replicates: int = 1000
    seed: int = 0
    level: float = 0.95
    alpha: float = 0.05
    permutations: int = 10000

    def __post_init__(self) -> None:
        if self.permutations < 1:
            raise ValueError(f"permutations: {self.permutations} must be >= 1")
        for name in ("level", "alpha"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be in (0, 1)")
        if 2.0 / (self.replicates + 1) >= self.alpha:
            raise ValueError(f"replicates: with {self.replicates} the smallest paired p-value, 2 / (replicates + 1) = "
                             f"{2.0 / (self.replicates + 1):.3g}, is not below alpha {self.alpha:g}; use at least "
                             f"{math.ceil(2.0 / self.alpha)} replicates")


# sbatch options the study sets itself (the typed fields of SlurmSettings, or what submitit and the dependencies own)
SBATCH_OWNED = {"partition": "partition", "time": "time_min", "gpus-per-node": "gpus_per_job",
                "cpus-per-task": "cpus_per_job", "mem": "mem_gb", "signal": "signal_delay_s", "job-name": None,
                "output": None, "error": None, "dependency": None, "array": None, "open-mode": None, "wrap": None}


@dataclass(frozen=True, kw_only=True)
class SlurmSettings:
    """The ``launcher.slurm:`` block: what each job of the study asks SLURM for (one job = one method and seed).

    Attributes:
        partition: the partition (None: the cluster's default).
        time_min: the wall-time limit of one job in minutes. A job that reaches it (or is preempted) ends its run as
            interrupted and is requeued; the requeued job resumes the run from its ``latest.pt``.
        gpus_per_job: GPUs of one job (``--gpus-per-node``); 0 for CPU-only jobs.
        cpus_per_job: CPUs of one job (``--cpus-per-task``); also the job's ``OMP_NUM_THREADS`` unless the
            submitting shell set one.
        mem_gb: memory of one job in GB (``--mem``; None: the partition's default).
        max_requeues: how many times a job that reached its time limit is requeued before it counts as failed.
        signal_delay_s: seconds before the time limit at which SLURM signals the job (``--signal=USR2@...``), the time
            the run has to end cleanly.
        sbatch: further ``sbatch`` options, ``{option: value}`` without the leading dashes (``{account: lab, qos:
            high, constraint: a100}``; ``true`` for a flag such as ``exclusive``).
        setup: shell lines run at the start of each job, before Python (``module load cuda/12.4``, ``source
            venv/bin/activate``).
        poll_s: seconds between two looks at the queue (``squeue``).
    """

    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    mem_gb: float | None = None
    max_requeues: int = 3
    signal_delay_s: int = 120
    sbatch: Mapping[str, str | int | bool] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    poll_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "setup", tuple(self.setup))
        object.__setattr__(self, "sbatch", dict(self.sbatch))
        for name, low in (("time_min", 1), ("gpus_per_job", 0), ("cpus_per_job", 1), ("max_requeues", 0),
                          ("signal_delay_s", 10)):
            if getattr(self, name) < low:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be >= {low}")
        if self.mem_gb is not None and self.mem_gb <= 0:
            raise ValueError(f"mem_gb: {self.mem_gb!r} must be > 0")
        if self.poll_s <= 0:
            raise ValueError(f"poll_s: {self.poll_s!r} must be > 0")
        if self.signal_delay_s >= self.time_min * 60:
            raise ValueError(f"signal_delay_s: {self.signal_delay_s} s is not shorter than time_min "
                             f"({self.time_min} min): the job would be signalled before it starts")
        for key in self.sbatch:
            if key.startswith("-") or "_" in key or not key:
                raise ValueError(f"sbatch: {key!r}: write the option as sbatch spells it, without dashes "
                                 f"(e.g. 'mail-user')")
            if key in SBATCH_OWNED:
                owner = SBATCH_OWNED[key]
                raise ValueError(f"sbatch: {key!r} is set by the study" + (f"; use {owner}:" if owner else ""))


@dataclass(frozen=True, kw_only=True)
class LauncherSettings:
    """The ``launcher:`` block: where the study's jobs run (the command line's ``--launcher``, ``--jobs``, ... win).

    Attributes:
        kind: ``local`` (on this machine) or ``slurm`` (each job a SLURM job, submitted through submitit).
        jobs: local only: how many jobs run at once (each pinned to its own GPU when there are GPUs, else to its
            share of the CPU threads).
        slurm: what each SLURM job asks for (:class:`SlurmSettings`).
    """

    kind: Literal["local", "slurm"] = "local"
    jobs: int = 1
    slurm: SlurmSettings = SlurmSettings()

    def __post_init__(self) -> None:
        if self.jobs < 1:
            raise ValueError(f"jobs: {self.jobs!r} must be >= 1")
        if self.kind == "slurm" and self.jobs != 1:
            raise ValueError(f"jobs: {self.jobs} applies to kind 'local' (SLURM runs as many jobs at once as the "
                             f"cluster allows)")


@dataclass(frozen=True, kw_only=True)
class Job:
    """One run of a study: a method with one seed (None: the config's own seed, when the study lists no seeds)."""

    method: Method
    seed: int | None

    @property
    def key(self) -> str:
        """The job's name in ``runs.json`` and the logs: ``<method>`` or ``<method>/seed<k>``."""
        return self.method.name if self.seed is None else f"{self.method.name}/seed{self.seed}"

    def overrides(self, study: Study) -> tuple[str, ...]:
        """The ``--set`` values that make this run what it is: the study's, the seed, the method's."""
        seed = () if self.seed is None else (f"experiment.seed={self.seed}",)
        return (*study.overrides, *seed, *self.method.overrides)

    def defining(self, overrides: Sequence[str]) -> tuple[str, ...]:
        """``overrides`` without those that only place the run or point at other runs (folder, name, wandb, resume,
        the weights or stage-1 checkpoint of a dependency): what two runs of one job must share."""
        placing = {*PLACING_KEYS, *((self.method.stage1.key,) if self.method.stage1 else ())}
        return tuple(o for o in overrides if (k := o.split("=", 1)[0].strip()) not in placing
                     and not k.startswith("wandb."))


@dataclass(frozen=True, kw_only=True)
class Study:
    """A parsed study YAML (paths resolved against the YAML's folder)."""

    name: str
    experiment: str
    output_dir: Path
    overrides: tuple[str, ...]
    methods: tuple[Method, ...]
    source: Path
    seeds: tuple[int | None, ...] = (None,)
    statistics: Statistics = Statistics()
    reference: Path | None = DEFAULT_REFERENCE
    launcher: LauncherSettings = LauncherSettings()

    @property
    def folder(self) -> Path:
        return self.output_dir / self.experiment / "_studies" / self.name

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def jobs(self) -> list[Job]:
        """Every (method, seed), seed by seed in method order: a job's dependencies come before it."""
        return [Job(method=m, seed=s) for s in self.seeds for m in self.methods]

    def runs_of(self, method: Method) -> list[Path]:
        """The method's run folders, oldest first (timestamped names sort in time order)."""
        parent = self.output_dir / self.experiment / method.name
        return sorted(p for p in parent.glob("*") if p.is_dir()) if parent.is_dir() else []


def _strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"{where}: expected a list of 'key.path=value' strings, got {value!r}")
    return tuple(value)


def _stage1(value: object, where: str) -> Stage1 | None:
    if value is None:
        return None
    check_keys(value, ("from", "set", "checkpoint"), where, required=("from", "set"))
    assert isinstance(value, Mapping)
    checkpoint = str(value.get("checkpoint", "latest.pt"))
    if checkpoint not in ("latest.pt", "best.pt"):
        raise ConfigError(f"{where}.checkpoint: {checkpoint!r} must be 'latest.pt' or 'best.pt'")
    key = str(value["set"])
    if not key.startswith("model.params."):
        raise ConfigError(f"{where}.set: {key!r} must be a model.params.* key (the stage-1 checkpoint parameter)")
    return Stage1(method=str(value["from"]), key=key, checkpoint=checkpoint)


def _seeds(value: object, overrides: tuple[str, ...], where: str) -> tuple[int | None, ...]:
    if value is None:
        return (None,)
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise ConfigError(f"{where}: seeds: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where}: seeds: {value} lists a seed twice")
    clash = [o for o in overrides if o.split("=", 1)[0].strip() == "experiment.seed"]
    if clash:
        raise ConfigError(f"{where}: overrides: {clash[0]!r} and seeds: {value} both set the seed; keep seeds: only")
    return tuple(value)


def _reference(raw: Mapping[str, object], path: Path) -> Path | None:
    if "reference" not in raw:
        return DEFAULT_REFERENCE
    if raw["reference"] is None:
        return None
    reference = (path.parent / str(raw["reference"])).resolve()
    if not reference.is_file():
        raise ConfigError(f"{path}: reference: file not found: {reference}")
    return reference


def load_study(path: str | Path) -> Study:
    """Parse and check a study YAML; every error names the file and the key."""
    path = Path(path).resolve()
    raw = read_yaml(path)
    where = str(path)
    check_keys(raw, STUDY_KEYS, where, required=("methods",))
    methods_raw = raw["methods"]
    if not isinstance(methods_raw, list) or not methods_raw:
        raise ConfigError(f"{where}: methods: expected a non-empty list")
    methods: list[Method] = []
    for k, entry in enumerate(methods_raw):
        at = f"{where}: methods[{k}]"
        check_keys(entry, ("name", "config", "overrides", "weights_from", "stage1"), at, required=("config",))
        config = (path.parent / str(entry["config"])).resolve()
        if not config.is_file():
            raise ConfigError(f"{at}.config: file not found: {config}")
        name = str(entry.get("name") or read_yaml_name(config))
        methods.append(Method(name=name, config=config, overrides=_strings(entry.get("overrides"), f"{at}.overrides"),
                              weights_from=entry.get("weights_from"),
                              stage1=_stage1(entry.get("stage1"), f"{at}.stage1")))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: methods: run names {duplicates} appear twice; give each entry a distinct name:")
    for k, m in enumerate(methods):
        if m.weights_from is not None and m.weights_from not in names[:k]:
            raise ConfigError(f"{where}: methods[{k}].weights_from: {m.weights_from!r} is not a method listed before "
                              f"it ({names[:k]})")
        if m.stage1 is not None and m.stage1.method not in names[:k]:
            raise ConfigError(f"{where}: methods[{k}].stage1.from: {m.stage1.method!r} is not a method listed before "
                              f"it ({names[:k]})")
    output_dir = Path(str(raw.get("output_dir", "runs")))
    overrides = _strings(raw.get("overrides"), f"{where}: overrides")
    return Study(name=str(raw.get("name") or path.stem), experiment=str(raw.get("experiment", "normative_eval")),
                 output_dir=output_dir if output_dir.is_absolute() else Path.cwd() / output_dir,
                 overrides=overrides, methods=tuple(methods), source=path,
                 seeds=_seeds(raw.get("seeds"), overrides, where),
                 statistics=to_dataclass(Statistics, raw.get("statistics") or {}, f"{where}: statistics"),
                 reference=_reference(raw, path),
                 launcher=to_dataclass(LauncherSettings, raw.get("launcher") or {}, f"{where}: launcher"))


def read_yaml_name(config: Path) -> str:
    """A config's ``name`` (following ``_base_``), else its file stem: the run-folder name Main will use."""
    return str(load_config(config, []).get("name") or config.stem)


def run_status(run_dir: Path) -> str:
    """``finished``, ``resumable`` (a latest.pt, not finished) or ``unusable``."""
    status = read_manifest(run_dir).get("status")
    if isinstance(status, dict):
        status = status.get("state")
    if status == "finished":
        return "finished"
    if (run_dir / "checkpoints" / "latest.pt").is_file():
        return "resumable"
    return "unusable"


def recorded_overrides(run_dir: Path) -> tuple[str, ...] | None:
    """The ``--set`` values a run was started with (its ``config.yaml`` ``overrides``); None without a config."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return tuple(str(o) for o in (read_yaml(path).get("overrides") or ()))


def runs_of_job(study: Study, job: Job) -> list[Path]:
    """The job's run folders, oldest first: its method's runs made with the job's defining overrides
    (:meth:`Job.defining`: the study's, the seed, the method's; a run of another study with other settings does
    not count) and, with a seed, of that seed (``manifest.json`` ``seed``)."""
    expected = job.defining(job.overrides(study))
    out = []
    for run in study.runs_of(job.method):
        recorded = recorded_overrides(run)
        if recorded is None or job.defining(recorded) != expected:
            continue
        if job.seed is None or read_manifest(run).get("seed") == job.seed:
            out.append(run)
    return out


def finished_run(study: Study, job: Job) -> Path | None:
    """The newest finished run folder of a job, if any."""
    return next((r for r in reversed(runs_of_job(study, job)) if run_status(r) == "finished"), None)
