"""model.weights: no silent random weights; pretrained weights come from the local cache only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.config import ModelConfig, load_config
from explain_cli.errors import ConfigError
from explain_cli.models import build_model, pretrained_file

BASE = {"model": {"arch": "torchvision:resnet18"}, "input": {"dir": "."}}


def write(tmp_path: Path, model: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**BASE, "model": model}))
    return path


def test_library_arch_without_checkpoint_or_weights_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {"arch": "torchvision:vgg16"}))
    assert info.value.key == "model.weights"
    assert "random" in info.value.message and "pretrained" in info.value.message
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, {"arch": "timm:resnet10t"}))])
    assert result.exit_code == 2 and "model.weights" in result.output


@pytest.mark.parametrize("model, key, words", [
    ({"arch": "torchvision:resnet18", "weights": "checkpoint"}, "model.weights", "needs model.checkpoint"),
    ({"arch": "torchvision:resnet18", "weights": "pretrained", "checkpoint": "x.pt"}, "model.weights", "exclude"),
    ({"arch": "python:m:f", "weights": "pretrained"}, "model.weights", "hold their own weights"),
    ({"arch": "torchscript", "weights": "random"}, "model.weights", "hold their own weights"),
    ({"arch": "torchvision:resnet18", "weights": "pretrainde"}, "model.weights", "did you mean 'pretrained'"),
])
def test_inconsistent_weights_name_the_key(tmp_path, model, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, model))
    assert info.value.key == key and words in str(info.value), str(info.value)


def test_checkpoint_implies_weights_checkpoint_and_factories_need_nothing(tmp_path):
    cfg = load_config(write(tmp_path, {"arch": "torchvision:resnet18", "checkpoint": "x.pt"}))
    assert cfg.model.weights == "checkpoint"
    assert load_config(write(tmp_path, {"arch": "python:m:f"})).model.weights is None


def _resolver(folder: Path):
    return lambda p: folder / p


def test_torchvision_pretrained_missing_file_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torchvision

    name = Path(torchvision.models.get_model_weights("resnet18").DEFAULT.url).name
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(arch="torchvision:resnet18", weights="pretrained"), _resolver(tmp_path))
    assert info.value.key == "model.weights"
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / name) in info.value.message
    assert "nothing is downloaded" in info.value.message


def test_torchvision_pretrained_loads_the_cached_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import torchvision

    weights = torchvision.models.get_model_weights("squeezenet1_1").DEFAULT
    torch.manual_seed(7)
    ref = torchvision.models.squeezenet1_1(weights=None).eval()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / Path(weights.url).name)
    model = build_model(ModelConfig(arch="torchvision:squeezenet1_1", weights="pretrained"), _resolver(tmp_path))
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError) as info:  # pretrained heads fix the class count
        build_model(ModelConfig(arch="torchvision:squeezenet1_1", weights="pretrained", num_classes=3),
                    _resolver(tmp_path))
    assert info.value.key == "model.num_classes"
    (cache / Path(weights.url).name).write_bytes(b"truncated download")
    with pytest.raises(ConfigError) as info:
        build_model(ModelConfig(arch="torchvision:squeezenet1_1", weights="pretrained"), _resolver(tmp_path))
    assert info.value.key == "model.weights" and "cannot load the pretrained weights" in info.value.message


def test_timm_pretrained_from_the_hugging_face_cache_or_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as info:
        pretrained_file("timm:resnet10t")
    assert "models--timm--resnet10t" in info.value.message and str(tmp_path / "torch") in info.value.message

    torch.manual_seed(5)
    ref = timm.create_model("resnet10t", pretrained=False).eval()
    # the hub cache of timm's URL weights (torch.hub.get_dir()/checkpoints)
    url = timm.models.get_pretrained_cfg("resnet10t").url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(ref.state_dict(), cache / Path(url).name)
    assert pretrained_file("timm:resnet10t") == cache / Path(url).name
    # the Hugging Face cache layout wins when both are there (as timm prefers the hub)
    snapshot = hf / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (hf / "models--timm--resnet10t.c3_in1k" / "refs").mkdir()
    (hf / "models--timm--resnet10t.c3_in1k" / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snapshot / "model.safetensors"))
    assert pretrained_file("timm:resnet10t") == snapshot / "model.safetensors"
    model = build_model(ModelConfig(arch="timm:resnet10t", weights="pretrained"), _resolver(tmp_path))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x))


def test_run_json_and_report_say_which_weights_ran(tiny_project):
    from tests.conftest import write_images

    cfg = yaml.safe_load((tiny_project / "config.yaml").read_text())
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(tiny_project / "config.yaml"), "--no-progress", "--limit", "1"])
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["weights"] == {"kind": "checkpoint", "file": str(tiny_project / "tiny.pt")}

    write_images(tiny_project / "one", ["x.png"], size=32)
    cfg.update(model={"arch": "torchvision:squeezenet1_1", "num_classes": 3, "weights": "random"},
               input={"dir": "one"}, preprocess={"size": 32}, output={"dir": "rnd"},
               explainer={"name": "gradient", "nsamples": 2}, background={"from_input": 1})
    (tiny_project / "rnd.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["run", str(tiny_project / "rnd.yaml"), "--no-progress"])
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "rnd" / "run.json").read_text())
    assert info["weights"] == {"kind": "random", "file": None}
    assert "random weights" in (tiny_project / "rnd" / "report.html").read_text()
