"""Issue 22, a researcher's first hour: switching explainers from the command line, run history in
run.json, counts of skipped images, and the superpixel count of kernel."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.config import load_config
from explain_cli.errors import ConfigError
from tests.conftest import REPO

DEMO = REPO / "configs" / "demo.yaml"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# --- item 3: --explainer / --set explainer.name= ------------------------------------------------

def test_switching_explainer_drops_the_keys_the_new_one_lacks(caplog):
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        cfg = load_config(DEMO, ["explainer.name=deep"])
    assert cfg.explainer_settings.name == "deep" and "nsamples" not in cfg.explainer
    assert "dropped the explainer.nsamples key" in caplog.text
    # a key the new explainer has is kept (kernel has nsamples too)
    cfg = load_config(DEMO, [], {"explainer.name": "kernel"})
    assert cfg.explainer_settings.name == "kernel" and cfg.explainer_settings.nsamples == 32


def test_a_key_of_another_explainer_is_named_as_such_not_a_look_alike(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, ["explainer.name=deep", "explainer.nsamples=3"])  # given on purpose: kept
    assert info.value.key == "explainer.nsamples"
    assert "gradient and kernel explainers, not of deep" in info.value.message
    assert "did you mean" not in info.value.message
    data = yaml.safe_load(DEMO.read_text())
    data["explainer"] = {"name": "deep", "nsamples": 8}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="explainer.nsamples: a key of the gradient and kernel explainers"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="unknown key"):  # a plain typo still gets its hint
        load_config(DEMO, ["explainer.nsampels=3"])


def test_explainer_option_on_validate_and_run(tiny_project):
    result = invoke("validate", tiny_project / "config.yaml", "--explainer", "deep")
    assert result.exit_code == 0, result.output
    assert "name: deep" in result.output and "nsamples" not in result.output.split("explainer:")[1].split("output:")[0]
    result = invoke("run", tiny_project / "config.yaml", "--explainer", "partition", "--set",
                    "explainer.max_evals=20", "--no-progress", "--limit", "1")
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["config"]["explainer"]["name"] == "partition" and info["config"]["explainer"]["max_evals"] == 20
    result = invoke("run", tiny_project / "config.yaml", "--explainer", "shapley", "--no-progress")
    assert result.exit_code == 2 and "unknown explainer 'shapley'" in result.output


# --- item 4: layers shows what is explained ----------------------------------------------------

def test_layer_table_shows_the_explained_input_its_map_and_what_cannot_be_explained():
    import timm
    import torch
    import torchvision

    from explain_cli.models import layer_table

    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    model.unused = torch.nn.Conv2d(3, 3, 1)
    rows = {r.name: r for r in layer_table(model, 64)}
    assert rows["input"].input_shape == (1, 3, 64, 64) and rows["input"].map_size == (64, 64)
    # conv1 explains the pixels it takes (a map at pixels), not its 64x32x32 output
    assert rows["conv1"].input_shape == (1, 3, 64, 64) and rows["conv1"].output_shape == (1, 64, 32, 32)
    assert rows["conv1"].map_size == (64, 64) and rows["conv1"].problem is None
    assert rows["layer4"].input_shape == (1, 256, 4, 4) and rows["layer4"].map_size == (4, 4)
    assert rows["fc"].map_size is None and "2-D" in rows["fc"].problem
    assert rows["unused"].problem == "not called in the forward pass"

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            num_classes=3).eval()
    rows = {r.name: r for r in layer_table(vit, 32)}
    assert rows["blocks.1"].input_shape == (1, 17, 192) and rows["blocks.1"].map_size == (4, 4)


def test_layers_command_prints_the_table(tiny_project):
    result = invoke("layers", tiny_project / "config.yaml")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["layer", "type", "explained", "(input)", "map", "output"]
    row = next(line for line in lines if line.startswith("2 "))  # the second conv: takes 6x16x16
    assert row.split()[:5] == ["2", "Conv2d", "6x16x16", "16x16", "8x16x16"]
    row = next(line for line in lines if line.startswith("6 "))  # the Linear head
    assert "cannot be explained: takes a 2-D tensor" in row
