"""Study configs fail early and by name: typo'd keys, unknown models, impossible stages."""

import pytest

from waitlens.experiments.config import (
    CONFIG_DIR,
    ConfigError,
    check_models,
    load_config,
    parse_config,
)


def test_shipped_configs_parse():
    names = sorted(p.name for p in CONFIG_DIR.glob("*.toml"))
    assert {"organism.toml", "smollm2.toml", "s1-vs-r1-1.5b.toml", "s1-vs-r1-32b.toml"} <= set(names)
    for name in names:
        cfg = load_config(CONFIG_DIR / name)
        assert cfg.models, name


def test_default_config_is_the_organism():
    cfg = load_config()
    assert {m.spec for m in cfg.models.values()} == {"organism:base", "organism:sft-1k", "organism:post-large"}


def test_typo_key_names_the_closest_key():
    with pytest.raises(ConfigError, match=r"unknown key 'capture.layrs'.*did you mean 'capture.layers'"):
        parse_config({"models": {"a": "organism:base"}, "capture": {"layrs": "all"}})
    with pytest.raises(ConfigError, match=r"unknown key 'sed'.*'seed'"):
        parse_config({"models": {"a": "organism:base"}, "sed": 1})


def test_undefined_model_role():
    raw = {"models": {"a": "organism:base"}, "patching": {"source": "a", "target": "b"}}
    with pytest.raises(ConfigError, match="model 'b' is used but not defined"):
        parse_config(raw)


def test_unknown_model_fails_before_loading(tmp_path):
    raw = {"models": {"sft": str(tmp_path / "nope"), "post": "organism:post-large"}, "ablations": {"model": "post"}}
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match=r"models\.sft: model path not found"):
        check_models(cfg)
    cfg = parse_config({"models": {"sft": "nosuchfamily:x", "post": "nosuchfamily:y"}, "ablations": {"model": "post"}})
    with pytest.raises(ConfigError, match="unknown model family 'nosuchfamily'"):
        check_models(cfg)


def test_patching_between_different_shapes_is_refused(tmp_path):
    from tests.conftest import make_tiny_qwen

    a = make_tiny_qwen(tmp_path / "a", layers=2, d_model=32)
    b = make_tiny_qwen(tmp_path / "b", layers=3, d_model=32)
    cfg = parse_config({"models": {"sft": str(a), "post": str(b)}, "ablations": {"model": "post"}})
    with pytest.raises(ConfigError, match="cross-model patching needs models of the same shape.*n_layers=3.*n_layers=2"):
        check_models(cfg)
    cfg = parse_config({"models": {"sft": str(a), "post": str(b)}, "ablations": {"model": "post"},
                        "stages": ["trajectories", "positions", "capture"]})
    assert check_models(cfg)["post"]["n_layers"] == 3


def test_window_value_may_start_with_a_minus():
    from waitlens.experiments.cli import build_parser, join_negative_values

    argv = ["patch", "--source", "a", "--target", "b", "--trajectories", "t", "--out", "o", "--window", "-2:4"]
    assert join_negative_values(argv)[-1] == "--window=-2:4"
    assert build_parser().parse_args(join_negative_values(argv)).window == "-2:4"
    assert join_negative_values(["--window=-1:1", "--seed", "-3"]) == ["--window=-1:1", "--seed", "-3"]


def test_value_types_come_from_the_annotations():
    """A key someone adds is type-checked from its dataclass annotation alone (table-driven)."""
    from waitlens.experiments.config import _type_problem

    assert _type_problem(True, bool) is None and _type_problem("false", bool) == "true or false"
    assert _type_problem(True, int) == "an integer" and _type_problem(3, float) is None
    assert _type_problem("wait", list[str]) == "a list of strings" and _type_problem(["wait"], list[str]) is None
    assert _type_problem([0, "1"], list[int]) == "a list of integers"
    assert _type_problem("all", str | list[int]) is None and _type_problem([0, 2], str | list[int]) is None
    assert _type_problem(None, str | None) is None and _type_problem(3, str | dict | None) == "a string or a table"


def test_every_shipped_config_passes_the_value_checks():
    from waitlens.experiments.config import CONFIG_DIR, load_config

    for path in sorted(CONFIG_DIR.glob("*.toml")):
        assert load_config(path).name
