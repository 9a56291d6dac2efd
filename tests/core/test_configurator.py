"""The strict builder, the YAML loader and the modules a config may import."""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
import torch

import core.Configurator as configurator
from core.Configurator import (
    LIBRARY_MODULES,
    PROJECT_PACKAGES,
    ConfigError,
    allow_imports,
    apply_overrides,
    build,
    check_imports,
    check_value_bounds,
    import_problem,
    load_config,
    read_yaml,
    to_dataclass,
    type_problem,
)


class Widget:
    def __init__(self, *, size: int, scale: float = 1.0, mode: Literal["a", "b"] = "a",
                 channels: tuple[int, ...] = (1, 2), name: str | None = None) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.size, self.scale, self.mode, self.channels, self.name = size, scale, mode, channels, name


def block(**params):
    return {"module_name": "tests.core.test_configurator", "class_name": "Widget", "params": params}


def test_build_binds_params_without_mutating_the_block():
    spec = block(size=3, channels=[4, 5])
    frozen = repr(spec)
    widget = build(spec, "model")
    assert (widget.size, widget.scale, widget.channels) == (3, 1.0, [4, 5])
    assert repr(spec) == frozen


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({**block(size=1), "paramz": {}}, r"model\.paramz: unknown key \(did you mean 'params'\?\)"),
        (block(size=1, scal=2.0), r"model\.params\.scal: unknown parameter \(did you mean 'scale'\?\)"),
        (block(), r"model\.params\.size: required parameter is missing"),
        (block(size="big"), r"model\.params\.size: expected an integer, got str"),
        (block(size=1, mode="c"), r"model\.params\.mode: 'c' is not one of 'a', 'b'"),
        (block(size=1, channels=[1, "x"]), r"model\.params\.channels: item 1: expected an integer"),
        (block(size=-1), r"model: tests\.core\.test_configurator\.Widget: size must be >= 0"),
        ({"module_name": "tests.core.test_configurator", "class_name": "Wigdet"},
         r"model\.class_name: .* has no class 'Wigdet' \(did you mean 'Widget'\?\)"),
        ({"module_name": "model_zoo.no_such_module", "class_name": "X"},
         r"model\.module_name: no module named 'model_zoo\.no_such_module'"),
        ({"class_name": "Widget"}, r"model\.module_name: required"),
        ("AutoEncoder", r"model: expected a \{module_name, class_name, params\} block"),
    ],
)
def test_bad_blocks_name_the_yaml_path(spec, message):
    with pytest.raises(ConfigError, match=message):
        build(spec, "model")


class Meter:
    def __init__(self, *, rate: int = 1) -> None:
        if rate < 1:
            raise configurator.ParamError("rate", f"must be >= 1, got {rate}")


def test_a_constructor_value_error_about_one_parameter_names_its_yaml_path():
    spec = {"module_name": "tests.core.test_configurator", "class_name": "Meter", "params": {"rate": 0}}
    with pytest.raises(ConfigError, match=r"^trainer\.params\.rate: must be >= 1, got 0$"):
        build(spec, "trainer")
    assert str(configurator.ParamError("rate", "must be >= 1, got 0")) == "rate must be >= 1, got 0"
    assert str(configurator.ParamError("mode", "'x' is not one of 'a'", "mode='x' is not one of 'a'")) == (
        "mode='x' is not one of 'a'")


def test_wrong_base_class_is_refused():
    with pytest.raises(ConfigError, match="is not a subclass of Module"):
        build(block(size=1), "model", base=torch.nn.Module)


def test_injected_objects_cannot_come_from_yaml():
    with pytest.raises(ConfigError, match="set by the framework"):
        build(block(size=1, name="x"), "model", name="injected")


def test_type_problem_understands_common_annotations():
    assert type_problem(1, float) is None
    assert type_problem(True, int) is not None
    assert type_problem(None, int | None) is None
    assert type_problem([1, 2], list[int]) is None
    assert type_problem({"a": 1.5}, dict[str, float]) is None
    assert type_problem({"a": "x"}, dict[str, float]) is not None
    assert type_problem((64, 64), tuple[int, int]) is None
    assert type_problem((64,), tuple[int, int]) is not None


def test_yaml_tuple_base_composition_and_overrides(tmp_path):
    (tmp_path / "_base").mkdir()
    (tmp_path / "_base" / "data.yaml").write_text(
        "data:\n  params:\n    target_size: !!python/tuple [128, 128]\n    batch_size: 8\n")
    (tmp_path / "exp.yaml").write_text(
        "_base_: [_base/data.yaml]\ndata:\n  module_name: m\n  class_name: C\n  params:\n    batch_size: 4\n")
    config = load_config(tmp_path / "exp.yaml", ["data.params.batch_size=2", "experiment.seed=7"])
    assert config["data"]["params"] == {"target_size": (128, 128), "batch_size": 2}
    assert config["experiment"] == {"seed": 7}
    assert config["overrides"] == ["data.params.batch_size=2", "experiment.seed=7"]


def test_override_cannot_descend_into_a_scalar():
    with pytest.raises(ConfigError, match=r"--set 'name.x=1': name is a str"):
        apply_overrides({"name": "run"}, ["name.x=1"])


def test_merge_conflict_marker_is_refused(tmp_path):
    path = tmp_path / "conflict.yaml"
    path.write_text("name: a\n<<<<<<< HEAD\nseed: 1\n=======\nseed: 2\n>>>>>>> branch\n")
    with pytest.raises(ConfigError, match=r"conflict\.yaml:2: merge-conflict marker"):
        read_yaml(path)


def test_missing_base_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular _base_"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("_base_: nope.yaml\n")
    with pytest.raises(ConfigError, match="_base_ file not found: nope.yaml"):
        load_config(tmp_path / "c.yaml")


def test_unsafe_yaml_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(path)


def test_delete_marker_replaces_instead_of_merging(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "data:\n  params:\n    test: {embedded_set: {images: [a.csv]}}\n    batch_size: 4\n")
    (tmp_path / "b.yaml").write_text("data:\n  _delete_: true\n  params:\n    test: {real_set: {images: [b.csv]}}\n")
    (tmp_path / "exp.yaml").write_text("_base_: [a.yaml, b.yaml]\n")
    config = load_config(tmp_path / "exp.yaml")
    assert config["data"] == {"params": {"test": {"real_set": {"images": ["b.csv"]}}}}


# ------------------------------------------------------------------------------------ typed sub-blocks (dataclasses)
@dataclass(frozen=True, kw_only=True)
class Inner:
    rate: float = 1.0
    mode: Literal["x", "y"] = "x"


@dataclass(frozen=True, kw_only=True)
class Knob:
    level: int
    sampler: Literal["fast", "slow"] = "fast"
    steps: int | None = None
    inner: Inner = Inner()

    def __post_init__(self) -> None:
        if self.level < 0:
            raise ValueError(f"level={self.level} must be >= 0")


class Gadget:
    def __init__(self, *, knob: Knob = Knob(level=1), extra: Knob | None = None, size: int = 1) -> None:
        self.knob, self.extra, self.size = knob, extra, size


class SubGadget(Gadget):
    """Forwards the base's options through ``**gadget`` (as AutoDDPM does with DDPM's)."""

    def __init__(self, *, own: int = 0, **gadget: Any) -> None:
        super().__init__(**gadget)
        self.own = own


def gadget(cls: str = "Gadget", **params):
    return {"module_name": "tests.core.test_configurator", "class_name": cls, "params": params}


def test_mappings_become_dataclasses_nested_and_optional():
    spec = gadget(knob={"level": 3, "sampler": "slow", "inner": {"mode": "y"}}, extra={"level": 0, "steps": 4})
    frozen = repr(spec)
    built = build(spec, "model")
    assert built.knob == Knob(level=3, sampler="slow", inner=Inner(mode="y"))
    assert built.extra == Knob(level=0, steps=4) and isinstance(built.extra.inner, Inner)
    assert build(gadget(extra=None), "model").extra is None
    assert repr(spec) == frozen  # the config is not mutated


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"knob": {"levle": 1}}, r"model\.params\.knob\.levle: unknown key \(did you mean 'level'\?\); "
                                 r"valid keys: level, sampler, steps, inner"),
        ({"knob": {"sampler": "fast"}}, r"model\.params\.knob\.level: required key of Knob is missing"),
        ({"knob": {"level": "high"}}, r"model\.params\.knob\.level: expected an integer, got str \('high'\)"),
        ({"knob": {"level": 1, "sampler": "medium"}}, r"model\.params\.knob\.sampler: 'medium' is not one of "
                                                      r"'fast', 'slow'"),
        ({"knob": {"level": 1, "inner": {"mode": "z"}}}, r"model\.params\.knob\.inner\.mode: 'z' is not one of"),
        ({"knob": {"level": 1, "inner": {"rat": 2}}}, r"model\.params\.knob\.inner\.rat: unknown key \(did you "
                                                      r"mean 'rate'\?\)"),
        ({"knob": {"level": 1, "steps": 2.5}}, r"model\.params\.knob\.steps: expected int \| None, got float"),
        ({"extra": {"levl": 1}}, r"model\.params\.extra\.levl: unknown key \(did you mean 'level'\?\)"),
        ({"knob": "fast"}, r"model\.params\.knob: expected a mapping of Knob \(level, sampler, steps, inner\), "
                           r"got str"),
        ({"knob": {"level": -2}}, r"model\.params\.knob: Knob: level=-2 must be >= 0"),
    ],
)
def test_dataclass_blocks_are_checked_key_by_key(params, message):
    with pytest.raises(ConfigError, match=message):
        build(gadget(**params), "model")


def test_forwarded_kwargs_are_checked_against_the_base_constructor():
    built = build(gadget("SubGadget", own=2, size=3, knob={"level": 5}), "model")
    assert (built.own, built.size, built.knob) == (2, 3, Knob(level=5))
    with pytest.raises(ConfigError, match=r"model\.params\.sise: unknown parameter \(did you mean 'size'\?\); "
                                          r"valid parameters: own, knob, extra, size"):
        build(gadget("SubGadget", sise=3), "model")
    with pytest.raises(ConfigError, match=r"model\.params\.knob\.sampler: 'x' is not one of"):
        build(gadget("SubGadget", knob={"level": 1, "sampler": "x"}), "model")


def test_to_dataclass_and_type_problem_understand_dataclasses():
    assert to_dataclass(Knob, {"level": 2, "inner": {"rate": 3}}, "a.b") == Knob(level=2, inner=Inner(rate=3.0))
    assert to_dataclass(Knob, Knob(level=1), "a.b") == Knob(level=1)
    with pytest.raises(ConfigError, match=r"a\.b\.inner\.mode: 'q' is not one of"):
        to_dataclass(Knob, {"level": 2, "inner": {"mode": "q"}}, "a.b")
    assert type_problem({"level": 1}, Knob) is None
    assert type_problem({"level": 1, "inner": {"mode": "q"}}, Knob).startswith("inner.mode: 'q' is not one of")
    assert type_problem(None, Knob | None) is None


# ------------------------------------------------------------------------------------------------ imports
@pytest.fixture()
def fresh_allow_list():
    """Leaves the allow_imports list empty after the test."""
    yield
    allow_imports(None)


@pytest.fixture()
def side_effect_module(tmp_path, monkeypatch, fresh_allow_list):
    """A module outside the project whose import writes a marker file; returns (name, marker)."""
    name = "h28_side_effect"
    (tmp_path / f"{name}.py").write_text("from pathlib import Path\n\nPath(__file__).with_suffix('.imported')"
                                         ".write_text('ran')\n\n\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / f"{name}.imported"
    sys.modules.pop(name, None)


def test_a_module_outside_the_project_is_refused_before_it_is_imported(side_effect_module):
    name, marker = side_effect_module
    spec = {"module_name": name, "class_name": "Thing"}
    with pytest.raises(ConfigError, match=rf"model\.module_name: '{name}' is outside this project, and importing a "
                                          r"module runs its code: .*add a package of your own to the config's "
                                          r"allow_imports list"):
        build(spec, "model")
    assert not marker.exists() and name not in sys.modules
    assert allow_imports([name]) == (name,)
    assert type(build(spec, "model")).__name__ == "Thing" and marker.exists()  # allowed: really imported


def test_this_and_other_libraries_are_refused_but_the_shipped_ones_are_not():
    if "this" in sys.modules:
        pytest.skip("'this' was imported by something else")
    with pytest.raises(ConfigError, match=r"model\.module_name: 'this' is outside this project"):
        build({"module_name": "this", "class_name": "Zen"}, "model")
    assert "this" not in sys.modules  # its import prints the Zen of Python: it never ran
    with pytest.raises(ConfigError, match="'subprocess' is outside this project"):
        build({"module_name": "subprocess", "class_name": "Popen"}, "model", base=torch.nn.Module)
    for name in ("torch", "torch.nn", "torch.optim.swa_utils", "core_extra", "os.path", "tests_x"):
        assert import_problem(name) is not None, name
    for name in (*LIBRARY_MODULES, "model_zoo.ae", "core.Trainer", "projects.normative_eval", "tests.core"):
        assert import_problem(name) is None, name
    assert build({"module_name": "torch.optim.lr_scheduler", "class_name": "StepLR",
                  "params": {"step_size": 1}}, "s", optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1)).step_size == 1


def test_allow_imports_allows_a_package_and_what_is_below_it(fresh_allow_list):
    allow_imports(["my_lab.models"])
    assert import_problem("my_lab.models") is None and import_problem("my_lab.models.unet") is None
    assert import_problem("my_lab") is not None and import_problem("my_lab.modelsx") is not None
    allow_imports(None)
    assert import_problem("my_lab.models") is not None
    for bad in ("my_lab", ["my lab"], [1], {"a": 1}):
        with pytest.raises(ConfigError, match=r"allow_imports: expected a list of module names"):
            allow_imports(bad)


def test_project_packages_are_the_repository_top_level_packages():
    repo = Path(configurator.__file__).resolve().parents[1]
    assert sorted(PROJECT_PACKAGES) == sorted(p.name for p in repo.iterdir() if (p / "__init__.py").is_file())


def test_a_project_package_name_found_outside_the_repository_is_refused(tmp_path, monkeypatch):
    (tmp_path / "h28_shadow").mkdir()
    (tmp_path / "h28_shadow" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(configurator, "PROJECT_PACKAGES", (*PROJECT_PACKAGES, "h28_shadow"))
    assert "is not this repository's package (found at" in import_problem("h28_shadow.models")
    assert "h28_shadow" not in sys.modules


def test_check_imports_names_the_nested_block():
    config = {"model": {"module_name": "model_zoo.ae", "class_name": "AutoEncoder",
                        "params": {"blocks": [{"module_name": "model_zoo.ae", "class_name": "X"},
                                              {"module_name": "os", "class_name": "X"}]}}}
    with pytest.raises(ConfigError, match=r"^cfg\.model\.params\.blocks\[1\]\.module_name: 'os' is outside"):
        check_imports(config, "cfg")
    check_imports({"model": {"module_name": "model_zoo.ae", "class_name": "AutoEncoder"}}, "cfg")


def test_check_value_bounds_stops_a_shared_reference_bomb_and_deep_nesting():
    bomb: list = ["x"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # one object per level, 9**10 values when walked as a tree
    with pytest.raises(ConfigError, match=r"^ckpt: expands to more than 100000 values"):
        check_value_bounds({"vars": bomb}, "ckpt")
    deep: list = []
    for _ in range(70):
        deep = [deep]
    with pytest.raises(ConfigError, match=r"^ckpt: nested more than 64 levels deep"):
        check_value_bounds(deep, "ckpt")
    check_value_bounds({"model": {"params": {"channels": [4, 8]}}}, "ckpt")


@pytest.mark.parametrize(("old", "new", "class_name"), [
    ("core.DataLoader", "core.data_module", "DataModule"),
    ("core.DownstreamEvaluator", "core.evaluation", "DownstreamEvaluator"),
])
def test_a_renamed_module_keeps_its_earlier_yaml_name(old: str, new: str, class_name: str) -> None:
    assert configurator.MODULE_ALIASES[old] == new
    earlier = configurator.resolve_class({"module_name": old, "class_name": class_name}, "x")
    assert earlier is configurator.resolve_class({"module_name": new, "class_name": class_name}, "x")
    assert not (configurator.REPO_ROOT / (old.replace(".", "/") + ".py")).exists()  # a name, not a second module


def test_a_class_re_exported_by_a_package_is_offered_as_a_choice() -> None:
    with pytest.raises(ConfigError, match="did you mean 'DownstreamEvaluator'"):
        build({"module_name": "core.evaluation", "class_name": "DownstreamEvaluater"}, "downstream_tasks.x")
