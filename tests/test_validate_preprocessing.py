"""validate and init against the model's own preprocessing (issue 28, items 3 and 6): timm's data
config / torchvision's weights transforms read, each preprocess value's source printed, differing keys
listed; the model's accuracy on labelled images with the configured preprocessing."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.config import ModelConfig, PreprocessConfig
from explain_cli.images import model_input
from explain_cli.preprocess_check import (from_timm_data_config, matching_fraction, model_view, resize_side,
                                          torchvision_view)
from tests.conftest import importable_module, write_images


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _line(output: str, key: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"#   {key} "))


def _timm_config(folder: Path, weights: str = "random", **preprocess) -> Path:
    write_images(folder / "images", ["a.png", "b.png"], size=20)
    path = folder / "timm.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"arch": "timm:test_resnet", "weights": weights},
        "preprocess": preprocess, "input": {"dir": "images"}, "background": {"from_input": 2},
        "device": "cpu", "batch_size": 4}))
    return path


# -- the model's data config ------------------------------------------------------------------------

def test_validate_prints_each_preprocess_value_its_source_and_the_timm_models_own(tmp_path):
    # timm:test_resnet's pretrained config (timm has it without downloading): 3 x 160 x 160, bilinear,
    # crop_pct 0.95, mean = std = 0.5. This config: size 32 and nearest set, mean/std left at ImageNet's.
    cfg = _timm_config(tmp_path, size=32, interpolation="nearest", resize="crop", crop_fraction=0.95)
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "# preprocess: each value, where it came from, and timm:test_resnet's pretrained config" in out
    assert "a reference only: the weights are random" in out
    size = _line(out, "size")
    assert "config" in size and "model: 160" in size and "<- differs" in size
    interpolation = _line(out, "interpolation")
    assert "nearest" in interpolation and "config" in interpolation and "model: bilinear" in interpolation
    assert "<- differs" in interpolation
    mean = _line(out, "mean")
    assert "default" in mean and "model: [0.5, 0.5, 0.5]" in mean and "<- differs" in mean
    channels = _line(out, "channels")
    assert "default" in channels and "model: 3" in channels and "differs" not in channels
    crop = _line(out, "crop_fraction")
    assert "config" in crop and "model: 0.95" in crop and "differs" not in crop
    assert "intensity" in _line(out, "intensity")
    assert ("# preprocess differs from the model's own in preprocess.size, preprocess.interpolation, "
            "preprocess.mean, preprocess.std (allowed") in out
    assert "WARNING: preprocess differs" not in out  # random weights: a reference, not a warning

    # the same keys as the model's: nothing listed
    result = invoke("validate", cfg, "--set", "preprocess.size=160", "--set", "preprocess.interpolation=bilinear",
                    "--set", "preprocess.mean=[0.5,0.5,0.5]", "--set", "preprocess.std=[0.5,0.5,0.5]")
    assert result.exit_code == 0, result.output
    assert "# preprocess matches the model's own" in result.output and "<- differs" not in result.output


def test_a_pretrained_timm_model_that_differs_is_a_warning_not_an_error(tmp_path, monkeypatch):
    import timm

    import explain_cli.models

    weights = tmp_path / "test_resnet.pth"  # the "pretrained" file: what the cache would hold
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    monkeypatch.setattr(explain_cli.models, "pretrained_file", lambda arch: weights)
    cfg = _timm_config(tmp_path, weights="pretrained", size=32, resize="stretch")
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    assert "WARNING: preprocess differs from timm:test_resnet's pretrained config in preprocess.size, " \
           "preprocess.resize, preprocess.mean, preprocess.std" in result.output
    assert "a reference only" not in result.output
    assert "unused (resize: stretch)" in _line(result.output, "crop_fraction")


def test_a_user_transform_is_compared_by_what_it_makes(tmp_path, monkeypatch):
    importable_module(tmp_path, "mytf", textwrap.dedent("""
        from torchvision import transforms as T
        eval_transform = T.Compose([T.Resize(40), T.CenterCrop(32), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    """), monkeypatch)
    cfg = _timm_config(tmp_path, transform="python:mytf:eval_transform")
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "#   transform      python:mytf:eval_transform   config" in out
    assert "transform" in _line(out, "size") and "model: 160" in _line(out, "size")
    mean = _line(out, "mean")
    assert "transform's Normalize" in mean and "differs" not in mean
    assert "in preprocess.size (the transform's) (allowed" in out
    assert "#   interpolation" not in out  # the transform's own business


def test_a_python_factory_returning_a_timm_model_is_compared_with_its_pretrained_cfg(tiny_project, monkeypatch):
    importable_module(tiny_project, "timmfactory", "import timm\n\ndef make():\n"
                      "    return timm.create_model('test_resnet', pretrained=False, num_classes=3)\n", monkeypatch)
    result = invoke("validate", tiny_project / "config.yaml", "--set", "model.arch=python:timmfactory:make",
                    "--set", "model.checkpoint=null", "--set", "model.num_classes=null")
    assert result.exit_code == 0, result.output
    assert ("# preprocess: each value, where it came from, and the model's timm pretrained_cfg (a reference only: "
            "the factory's weights may have been trained otherwise)") in result.output
    assert "model: 160   <- differs" in _line(result.output, "size")
    assert "WARNING: preprocess differs" not in result.output


def test_a_model_without_a_data_config_prints_sources_only(tiny_project):
    result = invoke("validate", tiny_project / "config.yaml")
    assert result.exit_code == 0, result.output
    assert "the model carries no data config to compare with" in result.output
    size = _line(result.output, "size")
    assert "16" in size and "config" in size and "model:" not in size
    assert "default" in _line(result.output, "mean")
    assert "# predictions" not in result.output  # no truth CSV: not checked unless asked


def test_timm_data_config_mapping_non_square_and_modes():
    values, sides, notes = from_timm_data_config({"input_size": (1, 96, 160), "interpolation": "bicubic",
                                                  "crop_pct": 0.9, "crop_mode": "center", "mean": (0.5,),
                                                  "std": (0.25,)})
    assert values == {"channels": 1, "size": [96, 160], "resize": "crop", "crop_fraction": 0.9,
                      "interpolation": "bicubic", "mean": [0.5], "std": [0.25]}
    assert sides == (106, 177) and (resize_side(96, 0.9), resize_side(160, 0.9)) == sides  # floor, as timm
    values, _, notes = from_timm_data_config({"input_size": (3, 224, 224), "interpolation": "random",
                                              "crop_pct": None, "crop_mode": "squash", "mean": (0.5,) * 3,
                                              "std": (0.5,) * 3})
    assert values["crop_fraction"] == 0.875 and "interpolation" not in values  # timm's default crop_pct
    assert any("squash" in n for n in notes) and any("'random'" in n for n in notes)
    assert matching_fraction(224, (232, 232), round(224 / 232, 4)) == 0.9655


def test_torchvision_weights_transforms_are_read_without_building_or_downloading():
    view = model_view(ModelConfig(arch="torchvision:resnet50", weights="pretrained"))
    assert view is not None and view.trained
    assert view.values == {"channels": 3, "size": 224, "resize": "crop", "crop_fraction": 0.9655,
                           "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225]}
    assert view.resize_sides == (232, 232) and "torchvision:resnet50" in view.source
    assert torchvision_view("efficientnet_b3").values["interpolation"] == "bicubic"
    assert model_view(ModelConfig(arch="python:x:make")) is None  # a factory's plain module: nothing to read


@pytest.mark.parametrize("shape", [(300, 300), (257, 341), (400, 230)])
def test_the_models_values_reproduce_its_own_eval_transform_exactly(shape):
    """What init writes, through resize: crop, is timm's create_transform and torchvision's
    weights.transforms() tensor for tensor."""
    import torchvision
    from timm.data import create_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, shape + (3,), dtype=np.uint8))
    timm_cfgs = [{"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center",
                  "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)},
                 {"input_size": (3, 96, 160), "interpolation": "bilinear", "crop_pct": 0.9, "crop_mode": "center",
                  "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}]
    for data in timm_cfgs:
        values = from_timm_data_config(data)[0]
        ours = model_input(img, PreprocessConfig(**{k: v for k, v in values.items()}))[1]
        assert np.array_equal(ours, create_transform(**data)(img).numpy())
    for name in ("resnet50", "efficientnet_b3"):
        values = torchvision_view(name).values
        ours = model_input(img, PreprocessConfig(**values))[1]
        reference = torchvision.models.get_model_weights(name).DEFAULT.transforms()(img).numpy()
        assert np.abs(ours - reference).max() < 1e-6


def test_init_writes_the_timm_models_own_values_and_says_where_they_came_from(tmp_path):
    write_images(tmp_path / "images", ["x.png"], size=40)
    cfg = tmp_path / "starter.yaml"
    result = invoke("init", "timm:test_resnet", "-o", cfg, "--input", tmp_path / "images")
    assert result.exit_code == 0, result.output
    text = cfg.read_text()
    pre = yaml.safe_load(text)["preprocess"]
    assert pre == {"size": 160, "resize": "crop", "crop_fraction": 0.95, "interpolation": "bilinear",
                   "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    for key in ("size", "crop_fraction", "interpolation", "mean", "std"):
        line = next(line for line in text.splitlines() if line.startswith(f"  {key}:"))
        assert "# from timm:test_resnet's pretrained config" in line, line
    assert "timm's crop_pct: short side to floor(160 / 0.95) = 168 px" in text
    # the weights are not in the cache here: with random ones, validate finds the model's own values
    result = invoke("validate", cfg, "--set", "model.weights=random")
    assert result.exit_code == 0, result.output
    assert "# preprocess matches the model's own" in result.output
    assert "config" in _line(result.output, "interpolation")


def test_init_without_metadata_names_the_defaults(tiny_project):
    cfg = tiny_project / "starter.yaml"
    result = invoke("init", "python:tinynet:make", "--num-classes", "3", "-o", cfg, "--input", tiny_project / "images")
    assert result.exit_code == 0, result.output
    text = cfg.read_text()
    assert yaml.safe_load(text)["preprocess"]["interpolation"] == "bilinear"
    assert "interpolation: bilinear   # bilinear | bicubic | nearest" in text
    assert "mean: [0.485, 0.456, 0.406]   # ImageNet's (the default)" in text


# -- predictions on labelled images -----------------------------------------------------------------

BRIGHTNET = textwrap.dedent('''
    import torch
    from torch import nn

    def make(outputs=2):
        """'bright' when the image's normalised pixels average above 0: right only when the input is
        normalised with the mean it was made for (0.5)."""
        head = nn.Linear(3, outputs)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([[-1.0] * 3, [1.0] * 3]) if outputs == 2 else torch.ones(1, 3))
            head.bias.zero_()
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
''')


def _bright_project(root: Path, monkeypatch, n: int = 6, folders: bool = False, outputs: int = 2,
                    csv: bool = True) -> Path:
    importable_module(root, "brightnet", BRIGHTNET, monkeypatch)
    rng = np.random.default_rng(1)
    rows = ["file,label"]
    for i in range(n):
        for name, level in (("bright", 200), ("dark", 60)):
            rel = f"{name}/{i}.png" if folders else f"{name}-{i}.png"
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(level + rng.integers(-20, 20, (12, 14, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(path)
            rows.append(f"{rel},{name}")
    (root / "truth.csv").write_text("\n".join(rows) + "\n")
    (root / "labels.txt").write_text("dark\nbright\n")
    config = {"model": {"arch": "python:brightnet:make", "kwargs": {"outputs": outputs}},
              "labels": "labels.txt",
              "preprocess": {"size": 8, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
              "input": {"dir": "images"}, "background": {"from_input": 2}, "device": "cpu", "batch_size": 4}
    if csv:
        config["targets"] = {"from_csv": {"path": "truth.csv"}}
    path = root / "bright.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_with_a_truth_csv_prints_the_accuracy_with_this_preprocessing(tmp_path, monkeypatch):
    cfg = _bright_project(tmp_path, monkeypatch)
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    assert ("# predictions: 12 of 12 labelled images right (100%) with this preprocessing (labels from "
            "truth.csv)") in result.output
    assert "WARNING: predictions" not in result.output

    # the wrong mean: every image looks bright to the model
    result = invoke("validate", cfg, "--set", "preprocess.mean=[0.1,0.1,0.1]")
    assert result.exit_code == 0, result.output  # a warning, not an error
    assert "# predictions: 6 of 12 labelled images right (50%)" in result.output
    warning = next(line for line in result.output.splitlines() if line.startswith("WARNING: predictions"))
    assert "no better than always answering the most common label (50%)" in warning
    assert "all 12 images get the same class" in warning and "check preprocess" in warning

    result = invoke("validate", cfg, "--no-check-predictions")
    assert result.exit_code == 0 and "# predictions" not in result.output


def test_check_predictions_reads_labels_from_class_folders_and_spreads_50_over_them(tmp_path, monkeypatch):
    cfg = _bright_project(tmp_path, monkeypatch, n=30, folders=True, csv=False)
    result = invoke("validate", cfg)
    assert result.exit_code == 0 and "# predictions" not in result.output  # not asked, no truth CSV
    result = invoke("validate", cfg, "--check-predictions")
    assert result.exit_code == 0, result.output
    # bright/ sorts before dark/: an even spread still checks both classes
    assert ("# predictions: 50 of 50 labelled images right (100%) with this preprocessing (labels from folder "
            "names; 50 of the 60 labelled images, spread over them)") in result.output
    result = invoke("validate", cfg, "--check-predictions", "--set", "preprocess.std=[5,5,5]",
                    "--set", "preprocess.mean=[0.9,0.9,0.9]")
    assert "# predictions: 25 of 50 labelled images right (50%)" in result.output
    assert "WARNING: predictions: 50% of 50 labelled images right" in result.output


def test_check_predictions_without_labels_is_exit_2(tiny_project):
    result = invoke("validate", tiny_project / "config.yaml", "--check-predictions")
    assert result.exit_code == 2
    assert "--check-predictions: no labelled image: set targets.from_csv" in result.output


def test_a_one_output_model_is_right_by_its_threshold(tmp_path, monkeypatch):
    # one logit, two names (dark, then bright): binary; predicted bright when sigmoid(z) >= threshold
    cfg = _bright_project(tmp_path, monkeypatch, outputs=1)
    result = invoke("validate", cfg)
    assert result.exit_code == 0, result.output
    assert "# predictions: 12 of 12 labelled images right (100%)" in result.output
    # the bright images give p ~ 0.97: at threshold 0.999 the model calls every image dark
    result = invoke("validate", cfg, "--set", "targets.threshold=0.999")
    assert "# predictions: 6 of 12 labelled images right (50%)" in result.output
    assert "all 12 images get the same class" in result.output
