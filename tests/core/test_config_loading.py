"""YAML loading: duplicate keys are refused with file and line; ``1e-3`` is a float (YAML 1.2)."""

import pytest

from core.Configurator import ConfigError, load_config, parse_override, read_yaml


def test_duplicate_key_names_file_and_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  params:\n    lr: 1\n    depth: 2\n    lr: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:5: duplicate key 'lr' at line 5 \(first at line 3\)"):
        read_yaml(path)


def test_duplicate_top_level_block_is_refused_through_base_composition(tmp_path):
    (tmp_path / "base.yaml").write_text("trainer: {a: 1}\n")
    child = tmp_path / "child.yaml"
    child.write_text("_base_: base.yaml\ntrainer: {a: 2}\nname: x\ntrainer: {a: 3}\n")
    with pytest.raises(ConfigError, match=r"child\.yaml:4: duplicate key 'trainer'"):
        load_config(child)


def test_same_key_in_different_mappings_is_fine(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: {lr: 1}\nb: {lr: 2}\n")
    assert read_yaml(path) == {"a": {"lr": 1}, "b": {"lr": 2}}


@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("5E4", 5e4), ("-2e+2", -200.0), ("1.5e-4", 1.5e-4),
                                             ("3", 3), ("1_000", 1000), ("'1e-3'", "1e-3"), ("e5", "e5")])
def test_scientific_notation_is_a_number(tmp_path, text, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"lr: {text}\n")
    loaded = read_yaml(path)["lr"]
    assert loaded == value and type(loaded) is type(value)
    assert parse_override(f"x.lr={text}") == (["x", "lr"], value)
