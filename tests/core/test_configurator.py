"""The strict builder and the YAML loader."""

from dataclasses import dataclass
from typing import Any, Literal

import pytest
import torch

from core.Configurator import (
    ConfigError,
    apply_overrides,
    build,
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
