"""YAML loading: duplicate keys are refused with file and line; ``1e-3`` is a float (YAML 1.2); documents are
bounded in size, nesting and alias expansion."""

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


def _alias_bomb(levels: int, width: int = 9) -> str:
    """``vars:`` with ``levels`` anchors, each a list of ``width`` aliases of the previous one."""
    lines = ["vars:", f"  a0: &a0 [{', '.join(['x'] * width)}]"]
    lines += [f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_with_file_and_line_before_anything_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text("name: x\n" + _alias_bomb(6))  # 9**6 = 531441 values once expanded
    with pytest.raises(ConfigError, match=r"bomb\.yaml:\d+: the document expands to more than 100000 values "
                                          r"\(YAML alias \*a\d repeats"):
        load_config(path)


def test_alias_bomb_in_a_set_value_is_refused():
    bomb = "[" + ", ".join(["&a0 [x, x, x, x, x, x, x, x, x, x]"] + ["*a0"] * 9) + "]"  # 110 values: fine
    assert len(parse_override(f"vars.v={bomb}")[1]) == 10
    bomb = "[" + ", ".join(["&a [" + ", ".join(["x"] * 400) + "]"] + ["*a"] * 300) + "]"  # 1 + 301 * 401 values
    with pytest.raises(ConfigError, match=r"--set vars\.v:1: the document expands to more than 100000"):
        parse_override(f"vars.v={bomb}")


@pytest.mark.parametrize(("k", "refused"), [(98, False), (99, True)])
def test_expansion_count_is_exact_at_the_bound(tmp_path, k, refused):
    # values: the top mapping, key 'a', its 1000 (list + 999 items), key 'b', its list, k aliases of 1000 each
    assert 1004 + 1000 * k <= 100_000 if not refused else 1004 + 1000 * k > 100_000
    path = tmp_path / "c.yaml"
    path.write_text(f"a: &a [{', '.join(map(str, range(999)))}]\nb: [{', '.join(['*a'] * k)}]\n")
    if refused:
        with pytest.raises(ConfigError, match="expands to more than"):
            read_yaml(path)
    else:
        data = read_yaml(path)
        assert len(data["b"]) == k and data["b"][-1] == list(range(999))


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 65 + "]" * 65 + "\n")
    with pytest.raises(ConfigError, match=r"deep\.yaml:1: nested more than 64 levels deep"):
        read_yaml(deep)
    (tmp_path / "ok.yaml").write_text("x: " + "[" * 63 + "]" * 63 + "\n")
    assert read_yaml(tmp_path / "ok.yaml")["x"] is not None
    huge = tmp_path / "huge.yaml"
    huge.write_text("x: 1\n# " + "a" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"huge\.yaml: \d+ bytes, more than a config may hold \(1048576 bytes\)"):
        read_yaml(huge)


def test_shared_anchors_of_a_normal_config_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vars:\n  opt: &opt {lr: 1e-3}\na: {optimizer: *opt}\nb: {<<: *opt, momentum: 0.9}\n")
    data = load_config(path)
    assert data["a"]["optimizer"] == {"lr": 1e-3} and data["b"] == {"lr": 1e-3, "momentum": 0.9}
