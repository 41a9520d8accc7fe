"""Config loading: schema errors name the key, typos get suggestions, overrides and paths resolve."""

from pathlib import Path

import pytest
import yaml

from explain_cli.config import apply_overrides, load_config
from explain_cli.errors import ConfigError


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": {"arch": "torchvision:resnet18", "num_classes": 3, "weights": "random"}, "input": {"dir": "imgs"}}


def test_minimal_config_fills_defaults_and_resolves_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.explainer_settings.name == "gradient"
    assert cfg.explainer_settings.nsamples == 200
    assert cfg.output.top_k == 2 and cfg.output.format == "svg"
    assert cfg.background.from_input == 50
    assert cfg.resolve(cfg.input.dir) == tmp_path.resolve() / "imgs"
    assert cfg.resolve("/abs/x") == Path("/abs/x")


@pytest.mark.parametrize("override, key, fragment", [
    ("explainer.nsamples=0", "explainer.nsamples", ">= 1"),
    ("output.top_k=0", "output.top_k", ">= 1"),
    ("output.format=jpg", "output.format", "svg"),
    ("batch_size=-3", "batch_size", ">= 1"),
    ("device=gpu", "device", "cuda"),
    ("model.arch=keras:vgg", "model.arch", "torchvision:NAME"),
    ("preprocess.mean=[0.5, 0.5]", "preprocess", "3 values"),
])
def test_bad_values_name_the_key(tmp_path, override, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), [override])
    assert info.value.key == key
    assert fragment in str(info.value)
    assert "cfg.yaml" in str(info.value)


def test_unknown_key_suggests_nearest(tmp_path):
    data = {**BASE, "output": {"formt": "png"}}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    assert info.value.key == "output.formt"
    assert "did you mean 'format'" in str(info.value)


def test_unknown_top_level_key_and_explainer_key(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "bacth_size": 3}))
    assert "did you mean 'batch_size'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "explainer": {"name": "gradient", "nsample": 3}}))
    assert info.value.key == "explainer.nsample"
    assert "did you mean 'nsamples'" in str(info.value)


def test_unknown_explainer_suggests(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "explainer": {"name": "gradiant"}}))
    assert info.value.key == "explainer.name"
    assert "did you mean 'gradient'" in str(info.value)


def test_missing_required_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {"input": {"dir": "x"}}))
    assert info.value.key == "model"
    assert "missing" in str(info.value)


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, BASE), [
        "explainer.nsamples=50", "output.format=png", "input.exclude=['*-02*', '*+02*']",
        "explainer.local_smoothing=0.25"])
    assert cfg.explainer_settings.nsamples == 50
    assert cfg.output.format == "png"
    assert cfg.input.exclude == ["*-02*", "*+02*"]
    assert cfg.explainer_settings.local_smoothing == 0.25


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["explainer.nsamples"])


def test_background_sources_are_exclusive(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "background": {"from_input": 5, "dir": "bg"}}))
    assert info.value.key == "background"
