"""The deep (DeepSHAP / DeepLIFT rescale) explainer: additivity on real architectures, agreement with
shap.DeepExplainer, top-k ranking, batch independence, in-place / reused / functional ops."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from explain_cli.explainers import deep
from explain_cli.explainers.base import ExplainContext

# The documented bound: |sum(phi) - (f(x) - mean_r f(r))| <= BOUND * S, with
# S = max(|f(x) - mean_r f(r)|, mean_r |f(x) - f(r)|) (see docs/explainers/deep.md).
BOUND_FLOAT32 = 1e-3
BOUND_FLOAT64 = 1e-9


def make(model, background, layer=None, batch_size=64, **settings):
    context = ExplainContext(
        model=model, layer=layer, layer_name="input" if layer is None else "layer",
        background=background, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=torch.device("cpu"),
        batch_size=batch_size, settings=deep.Settings(**settings))
    return deep.Explainer(context)


def relative_additivity(model, background, images, attribution) -> np.ndarray:
    """Additivity error of each (image, rank) divided by the scale S of the explained differences."""
    with torch.no_grad():
        fx = model(images).double().numpy()
        fr = model(background).double().numpy()
    scale = np.empty(attribution.classes.shape)
    for i, row in enumerate(attribution.classes):
        for r, c in enumerate(row):
            diffs = fx[i, c] - fr[:, c]
            scale[i, r] = max(abs(diffs.mean()), np.abs(diffs).mean())
    assert scale.min() > 1e-3, "degenerate test: the outputs hardly differ"
    return attribution.additivity_error / scale


def calibrate(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Random weights, but batch-norm statistics of ``inputs`` (the test's own images and background):
    activations neither vanish nor explode (the default statistics make them vanish, statistics of
    other random images make some of them explode)."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None
            module.train()  # only batch norm: dropout and stochastic depth stay in eval mode
    with torch.no_grad():
        model(inputs)
    return model.eval()


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "timm:efficientnet_lite0":
        import timm
        return timm.create_model("efficientnet_lite0", pretrained=False, num_classes=10)
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=10)


def arch_data(size: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    background = torch.randn(3, 3, size, size, generator=g)
    images = torch.randn(2, 3, size, size, generator=g) * 1.5
    return background.to(dtype), images.to(dtype)


# input size per architecture: the smallest that goes through (vgg16 and densenet121 pool 5 times)
ARCHS = {"resnet18": 16, "resnet50": 16, "vgg16": 32, "densenet121": 32, "mobilenet_v3_small": 16,
         "efficientnet_b0": 16, "timm:efficientnet_lite0": 16}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_additivity_on_architectures_float32(arch, caplog):
    size = ARCHS[arch]
    background, images = arch_data(size)
    model = calibrate(build(arch), torch.cat([background, images]))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="explain_cli"):
        attribution = make(model, background).explain(images, 2, [0, 1])
    assert "no DeepLIFT rule" not in caplog.text  # every nonlinear call of the architecture has a rule
    assert attribution.values.shape == (2, 2, 3, size, size)
    rel = relative_additivity(model, background, images, attribution)
    assert rel.max() <= BOUND_FLOAT32, rel
    # the user's model is left as it was: no hooks, same weights, parameters still trainable
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ["resnet18", "tricky"])
def test_additivity_float64_is_exact_up_to_rounding(arch):
    # (float64 depthwise convolutions take a slow path on CPU: the squeeze-excitation products,
    # sigmoid and hardswish are covered by the small ``Tricky`` model instead of mobilenet/efficientnet)
    size = ARCHS.get(arch, 16)
    background, images = arch_data(size)
    net = build(arch) if arch != "tricky" else Tricky(inplace=True)
    model = calibrate(net, torch.cat([background, images])).double()
    background, images = background.double(), images.double()
    attribution = make(model, background).explain(images, 2, [0, 1])
    rel = relative_additivity(model, background, images, attribution)
    assert rel.max() <= BOUND_FLOAT64, rel


# -- agreement with shap on a plain CNN --------------------------------------------------------------


class PlainNet(nn.Module):
    """Only modules shap's DeepExplainer handles exactly: conv, non-in-place ReLU, 2x2 max-pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flat(x))))


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(0)
    model = PlainNet().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    g = torch.Generator().manual_seed(3)
    background = torch.randn(6, 3, 16, 16, generator=g)
    images = torch.randn(3, 3, 16, 16, generator=g) + torch.randn(3, 3, 1, 1, generator=g)
    return model, background, images


@pytest.mark.parametrize("target", ["input", "layer"])
def test_agrees_with_shap_deep_explainer(plain, target):
    import shap
    model, background, images = plain
    layer = None if target == "input" else model.conv2
    ours = make(model, background, layer).explain(images, 2, [0, 1, 2])
    reference = shap.DeepExplainer(model if layer is None else (model, layer), background)
    values, ranks = reference.shap_values(images, ranked_outputs=2, check_additivity=False)
    values = np.moveaxis(np.asarray(values), -1, 1)  # (N, C, H, W, k) -> (N, k, C, H, W)
    np.testing.assert_array_equal(ours.classes, ranks.numpy())
    assert ours.values.shape == values.shape
    np.testing.assert_allclose(ours.values, values, rtol=1e-4, atol=1e-6 * np.abs(values).max())
    np.testing.assert_allclose(ours.base_values, reference.expected_value[ours.classes], rtol=1e-5, atol=1e-6)


def test_layer_attributions_add_up_at_a_cut(plain):
    """Every path runs through conv2's input here, so the layer attributions add up as well."""
    model, background, images = plain
    attribution = make(model, background, model.conv2).explain(images, 3, [0, 1, 2])
    assert attribution.values.shape == (3, 3, 6, 8, 8)
    assert relative_additivity(model, background, images, attribution).max() <= BOUND_FLOAT32


# -- ranking, batching, determinism ------------------------------------------------------------------


def test_topk_order_batch_independence_and_base_values(plain):
    model, background, images = plain
    explainer = make(model, background, batch_size=4)  # chunks of 4 rows span several images
    together = explainer.explain(images, 3, [1, 2, 3])
    with torch.no_grad():
        out = model(images).numpy()
    np.testing.assert_array_equal(together.classes, np.argsort(-out, axis=1, kind="stable")[:, :3])
    np.testing.assert_allclose(together.outputs, np.take_along_axis(out, together.classes, 1), rtol=1e-6)
    with torch.no_grad():
        expected = model(background).double().mean(0).numpy()
    np.testing.assert_allclose(together.base_values, expected[together.classes], rtol=1e-6, atol=1e-7)
    assert np.all(np.diff(together.outputs, axis=1) <= 0)
    other = make(model, background, batch_size=64)
    for i in range(images.shape[0]):
        alone = other.explain(images[i:i + 1], 3, [100 + i])  # another seed: deep ignores seeds
        np.testing.assert_array_equal(alone.classes[0], together.classes[i])
        np.testing.assert_allclose(alone.values[0], together.values[i], rtol=1e-5,
                                   atol=1e-6 * np.abs(together.values[i]).max())


def test_max_background_caps_the_references(plain):
    model, background, images = plain
    capped = make(model, background, max_background=2).explain(images[:1], 1, [0])
    direct = make(model, background[:2]).explain(images[:1], 1, [0])
    np.testing.assert_allclose(capped.values, direct.values, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(capped.base_values, direct.base_values, rtol=1e-6)


def test_settings():
    assert deep.Settings().name == "deep"
    assert deep.Settings(max_background=5).max_background == 5
    with pytest.raises(ValidationError):
        deep.Settings(max_background=0)
    with pytest.raises(ValidationError):
        deep.Settings(nsamples=10)


# -- in-place, reused and functional operations ------------------------------------------------------


class Tricky(nn.Module):
    """In-place ReLU reused three times, functional relu/sigmoid/hardswish, a residual ``+=``, an
    overlapping max-pool, a squeeze-excitation product and a division by an input-dependent tensor."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=inplace)  # used three times
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.se1 = nn.Conv2d(8, 4, 1)
        self.se2 = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        y = self.relu(self.conv2(x))
        y = F.relu(self.conv3(y), inplace=self.inplace)
        if self.inplace:
            y += x
        else:
            y = y + x
        s = torch.sigmoid(self.se2(self.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        y = F.hardswish(y * s)
        y = y / (1.0 + y.abs())
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def tricky_pair():
    torch.manual_seed(2)
    inplace = Tricky(inplace=True)
    calibrate(inplace, torch.cat(arch_data(16)))
    outplace = Tricky(inplace=False)
    outplace.load_state_dict(inplace.state_dict())
    return inplace.eval(), outplace.eval()


def test_inplace_reused_and_functional_ops(tricky_pair, caplog):
    inplace, outplace = tricky_pair
    background, images = arch_data(16)
    with caplog.at_level(logging.WARNING, logger="explain_cli"):
        a = make(inplace, background, batch_size=5).explain(images, 2, [0, 1])
        b = make(outplace, background).explain(images, 2, [0, 1])
    assert "no DeepLIFT rule" not in caplog.text
    assert relative_additivity(inplace, background, images, a).max() <= BOUND_FLOAT32
    np.testing.assert_array_equal(a.classes, b.classes)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=1e-6 * np.abs(b.values).max())
    # an image equal to a reference: u_x == u_r at every call (the rescale rule's fallback); its
    # attributions add up too, and the identical reference contributes nothing
    same = make(inplace, background).explain(background[:1], 1, [0])
    alone = make(inplace, background[1:]).explain(background[:1], 1, [0])
    np.testing.assert_allclose(same.values * 3, alone.values * 2, rtol=1e-4, atol=1e-7)
    assert relative_additivity(inplace, background, background[:1], same).max() <= BOUND_FLOAT32
    # the model still computes what it computed before (in-place semantics kept, nothing left behind)
    with torch.no_grad():
        np.testing.assert_allclose(inplace(images).numpy(), outplace(images).numpy(), rtol=1e-5, atol=1e-6)


class Attention(nn.Module):
    """Bilinear products (matmul), softmax, layer norm and GELU: decomposed into exact rules."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, tokens, 8)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1)
        t = t + attn @ v
        t = t + self.mlp(self.norm(t))
        return self.head(t.mean(1))


def test_attention_softmax_layer_norm_are_exact(caplog):
    torch.manual_seed(4)
    model = Attention().eval()
    background, images = arch_data(16)
    with caplog.at_level(logging.WARNING, logger="explain_cli"):
        attribution = make(model, background).explain(images, 2, [0, 1])
    assert "no DeepLIFT rule" not in caplog.text
    assert relative_additivity(model, background, images, attribution).max() <= BOUND_FLOAT32


class WithWhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3)
        self.b = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.fc(torch.where(a > b, a, b).mean((2, 3)))


def test_unsupported_op_is_reported(caplog):
    torch.manual_seed(5)
    model = WithWhere().eval()
    background, images = arch_data(8)
    with caplog.at_level(logging.WARNING, logger="explain_cli"):
        make(model, background).explain(images, 1, [0, 1])
    assert "no DeepLIFT rule for where" in caplog.text


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_model_is_refused(plain):
    from explain_cli.errors import ConfigError

    model, background, images = plain
    scripted = torch.jit.script(model)
    with pytest.raises(ConfigError, match="eager"):
        make(scripted, background).explain(images[:1], 1, [0])
