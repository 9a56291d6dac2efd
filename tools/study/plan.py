"""The study YAML and what it asks for: methods, seeds, statistics settings, and the jobs (one per method and seed).

Also where a job's runs live and which of them counts: run folders are read, never written, here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.Configurator import ConfigError, check_keys, load_config, read_yaml, to_dataclass
from dl_utils.run import read_manifest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCE = REPO / "docs" / "reference_results.csv"
STUDY_KEYS = ("name", "experiment", "output_dir", "overrides", "seeds", "statistics", "reference", "methods")
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
                 reference=_reference(raw, path))


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
