"""explain-cli init MODEL: a commented starter config that validates as written."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from typer.testing import CliRunner

from explain_cli.cli import app
from tests.conftest import write_images


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_init_from_a_checkpoint_and_its_arch_then_validate(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), tmp_path / "best.pt")
    write_images(tmp_path / "crops", ["a.png", "b.png"], size=40)
    cfg = tmp_path / "first.yaml"
    result = invoke("init", tmp_path / "best.pt", "--arch", "torchvision:resnet18", "--input", tmp_path / "crops",
                    "-o", cfg)
    assert result.exit_code == 0, result.output
    text = cfg.read_text()
    data = yaml.safe_load(text)
    assert data["model"] == {"arch": "torchvision:resnet18", "checkpoint": "best.pt", "num_classes": 3,
                             "layer": "input"}  # the class count comes from the checkpoint's classifier
    assert data["input"]["dir"] == "crops" and data["input"]["exclude"] == []
    assert "#   layer4.0 " in text and "map 14x14" in text  # explainable layers as comments
    assert "#   fc " not in text  # the Linear head cannot be explained
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    assert "# images to process: 2" in result.output
    result = invoke("init", tmp_path / "best.pt", "--arch", "torchvision:resnet18", "-o", cfg)
    assert result.exit_code == 2 and "exists" in result.output  # never overwrites silently
    result = invoke("init", tmp_path / "best.pt", "-o", tmp_path / "other.yaml")
    assert result.exit_code == 2 and "--arch" in result.output


def test_init_library_model_with_pretrained_weights_in_the_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    write_images(tmp_path / "images", ["x.png"], size=40)
    cfg = tmp_path / "sq.yaml"
    result = invoke("init", "torchvision:squeezenet1_1", "-o", cfg, "--input", tmp_path / "images")
    assert result.exit_code == 0, result.output
    assert "validate and run will fail until the weights are there" in result.output  # not in the cache yet
    assert invoke("validate", cfg).exit_code == 2
    url = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT.url
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(),
               tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name)
    data = yaml.safe_load(cfg.read_text())
    assert data["model"]["weights"] == "pretrained" and data["preprocess"]["resize"] == "crop"
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    assert "weights: pretrained" in result.output


def test_init_python_factory_then_run(tiny_project):
    cfg = tiny_project / "starter.yaml"
    result = invoke("init", "python:tinynet:make", "--num-classes", "3", "-o", cfg, "--input",
                    tiny_project / "images")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(cfg.read_text())
    assert "weights" not in data["model"] and data["labels"] is None
    result = invoke("run", cfg, "--no-progress", "--limit", "1", "--set", "explainer.nsamples=4",
                    "--set", "preprocess.size=16", "--class", "class 1")  # the first-hour path ends here
    assert result.exit_code == 0, result.output
    import csv

    with open(tiny_project / "out" / "topk.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class_index"] for r in rows] == ["1"]  # only the asked class
