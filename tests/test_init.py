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


HOSTILE_NAMES = ["photos #1", "a: b", "yes", "no", "[x]", "{x}", "~", "~user", "*star", "&anchor", "@at", "%pct",
                 "!tag", "- dash", "? q", "null", "1.5", "0x10", "'quoted'", '"dq"', "trailing ", " leading",
                 "tab\there", "back\\slash", "é ü 写真", "a,b", "| pipe", "> fold", "`tick`", "x #y: z"]


def test_init_writes_hostile_folder_and_checkpoint_names_that_read_back_as_themselves(tiny_project):
    """Issue 31 (2): `--input "photos #1"` was written unquoted and read back as `photos`."""
    import shutil

    ckpt = tiny_project / "best #1.pt"
    shutil.copy(tiny_project / "tiny.pt", ckpt)
    for i, name in enumerate(HOSTILE_NAMES):
        cfg = tiny_project / f"c{i}.yaml"
        result = invoke("init", ckpt, "--arch", "python:tinynet:make", "--input", tiny_project / name, "-o", cfg)
        assert result.exit_code == 0, (name, result.output)
        data = yaml.safe_load(cfg.read_text())
        expected = f"./{name}" if name.startswith("~") else name  # a literal folder, not the home folder
        assert data["input"]["dir"] == expected, name
        assert data["model"]["checkpoint"] == "best #1.pt" and data["model"]["num_classes"] == 3


def test_init_input_name_with_a_newline_stays_one_value(tiny_project):
    cfg = tiny_project / "nl.yaml"
    result = invoke("init", "python:tinynet:make", "--input", tiny_project / "two\nlines", "-o", cfg)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(cfg.read_text())["input"]["dir"] == "two\nlines"


def test_init_refuses_and_writes_nothing_when_the_text_would_not_read_back(tiny_project, monkeypatch):
    """The round-trip check itself: with unquoted values (the old writer) `photos #1` is refused,
    and no file is left behind for a rerun to trip over."""
    import explain_cli.init as init_module

    monkeypatch.setattr(init_module, "yaml_value", str)
    cfg = tiny_project / "new" / "deeper" / "c.yaml"
    result = invoke("init", "python:tinynet:make", "--input", tiny_project / "photos #1", "-o", cfg)
    assert result.exit_code == 2, result.output
    assert "input.dir" in result.output and "photos #1" in result.output
    assert not (tiny_project / "new").exists()  # not even the folders it would have made


def test_init_writes_nothing_when_the_written_config_does_not_validate(tiny_project, monkeypatch):
    import explain_cli.config as config_module
    from explain_cli.errors import ConfigError

    def refuse(path, *args, **kwargs):
        raise ConfigError("model.arch", "refused for the test", str(path))

    monkeypatch.setattr(config_module, "load_config", refuse)
    cfg = tiny_project / "c.yaml"
    result = invoke("init", "python:tinynet:make", "-o", cfg)
    assert result.exit_code == 2 and "refused for the test" in result.output
    assert str(cfg) in result.output  # names the file asked for, not a temporary one
    assert sorted(p.name for p in tiny_project.iterdir() if p.name.startswith(".c.yaml")) == []
    assert not cfg.exists()


def test_init_user_errors_are_exit_2_without_a_traceback(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [("torchvision:",), ("python:tiny",), ("timm:",), ("torchvision:resnet18", "-o", tmp_path / "afile" / "c.yaml"),
             ("torchvision:resnet18", "-o", tmp_path / "folder")]
    for args in cases:
        result = invoke("init", *args)
        assert result.exit_code == 2, (args, result.output)
        assert "unexpected" not in result.output and "Traceback" not in result.output
        assert "ValidationError" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]


def test_init_into_an_unwritable_folder_is_exit_2_before_the_model_is_built(tmp_path, monkeypatch):
    """Issue 31 (4): the check comes first, so a model that would take minutes to build is never built."""
    import explain_cli.config as config_module
    import explain_cli.init as init_module

    def read_only(path, *args, key="output.dir", **kwargs):
        from explain_cli.errors import ConfigError

        raise ConfigError(key, f"cannot write to {path}: read-only file system")

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(config_module, "check_output_dir", read_only)
    monkeypatch.setattr(init_module, "starter_config", never)
    result = invoke("init", "torchvision:resnet18", "-o", tmp_path / "ro" / "c.yaml")
    assert result.exit_code == 2, result.output
    assert "read-only" in result.output and "--output" in result.output


def test_init_into_a_mode_555_folder_is_exit_2(tmp_path):
    import os

    import pytest

    if os.geteuid() == 0:
        pytest.skip("root writes into a mode-555 folder")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        result = invoke("init", "torchvision:resnet18", "-o", locked / "c.yaml")
        assert result.exit_code == 2 and str(locked) in result.output, result.output
    finally:
        locked.chmod(0o755)


def test_init_with_a_too_long_file_name_is_exit_2(tmp_path):
    for output in (tmp_path / ("x" * 300 + ".yaml"), tmp_path / ("x" * 300) / "c.yaml", tmp_path / ("x" * 245 + ".yaml")):
        result = invoke("init", "torchvision:resnet18", "--weights", "random", "-o", output)
        assert result.exit_code == 2 and "unexpected" not in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_init_custom_checkpoints_stretch_and_one_logit_says_one_output(tmp_path):
    """A custom checkpoint's training transform is unknown: stretch (a crop cuts every tile's borders),
    saying why; a one-logit checkpoint gets top_k 1 and '1 output'; --resize crop is honoured."""
    import torchvision

    write_images(tmp_path / "tiles", ["a.png"], size=40)
    for classes in (2, 1):
        torch.save(torchvision.models.resnet18(weights=None, num_classes=classes).state_dict(),
                   tmp_path / f"m{classes}.pt")
        cfg = tmp_path / f"m{classes}.yaml"
        result = invoke("init", tmp_path / f"m{classes}.pt", "--arch", "torchvision:resnet18", "--input",
                        tmp_path / "tiles", "-o", cfg)
        assert result.exit_code == 0, result.output
        text = cfg.read_text()
        data = yaml.safe_load(text)
        assert data["model"]["num_classes"] == classes
        assert data["preprocess"]["resize"] == "stretch" and "crop_fraction" not in data["preprocess"]
        assert "custom weights" in text and "cut every image's borders" in text
        assert data["output"]["top_k"] == min(2, classes)
        assert "1 outputs" not in text
        assert invoke("validate", cfg).exit_code == 0
    assert "1 output (a sigmoid)" in (tmp_path / "m1.yaml").read_text()
    cfg = tmp_path / "crop.yaml"
    result = invoke("init", tmp_path / "m2.pt", "--arch", "torchvision:resnet18", "--input", tmp_path / "tiles",
                    "-o", cfg, "--resize", "crop")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(cfg.read_text())
    assert data["preprocess"]["resize"] == "crop" and data["preprocess"]["crop_fraction"] == 0.875
    assert "as asked (--resize)" in cfg.read_text()
