"""The gradient (expected gradients) explainer: agreement with shap, seeding, completeness, top-k."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from explain_cli.errors import ConfigError
from explain_cli.explainers import gradient
from explain_cli.explainers.base import ExplainContext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():  # larger weights: outputs spread over a few units, classes differ per image
        for p in net.parameters():
            p.mul_(3)
    return net


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    background = torch.randn(10, 3, 16, 16, generator=g) * 0.5
    shift = torch.randn(4, 3, 1, 1, generator=g) * 1.5
    images = torch.randn(4, 3, 16, 16, generator=g) + shift
    return background, images


def make(model, background, layer=None, batch_size=64, **settings):
    context = ExplainContext(
        model=model, layer=layer, layer_name="input" if layer is None else "conv2",
        background=background, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=torch.device("cpu"),
        batch_size=batch_size, settings=gradient.Settings(**settings))
    return gradient.Explainer(context)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("target", ["input", "layer"])
def test_agrees_with_shap(model, data, target, smoothing):
    shap = pytest.importorskip("shap")
    background, images = data
    x = images[[0, 2]]  # two images with different top classes
    layer = None if target == "input" else model.conv2
    nsamples = 2000

    ours = make(model, background, layer, batch_size=500, nsamples=nsamples, path="input",
                local_smoothing=smoothing).explain(x, 2, [11, 12])

    torch.manual_seed(5)  # shap draws its smoothing noise from torch's global generator
    reference = shap.GradientExplainer(model if layer is None else (model, layer), background,
                                       local_smoothing=smoothing)
    values, indexes = reference.shap_values(x, ranked_outputs=2, nsamples=nsamples, rseed=3)
    # shap 0.51: one array with the rank last, (N, *explained shape, k); indexes (N, k)
    values = np.moveaxis(np.asarray(values), -1, 1)

    np.testing.assert_array_equal(ours.classes, indexes.numpy())
    assert ours.values.shape == values.shape == ((2, 2, 3, 16, 16) if layer is None else (2, 2, 8, 14, 14))
    assert ours.values.dtype == np.float32
    for i in range(2):
        for r in range(2):
            assert pearson(ours.values[i, r], values[i, r]) >= 0.95, (i, r)
    # the totals agree too (Monte-Carlo error of both estimates)
    np.testing.assert_allclose(ours.shap_sum, values.reshape(2, 2, -1).sum(-1), rtol=0.1,
                               atol=0.05 * np.abs(values).reshape(2, 2, -1).sum(-1).max())


@pytest.mark.parametrize("target", ["input", "layer"])
def test_seeded_and_batch_independent(model, data, target):
    background, images = data
    layer = None if target == "input" else model.conv2
    seeds = [101, 202, 303, 404]
    settings = dict(nsamples=50, local_smoothing=0.2)  # 50 samples: chunks and noise blocks straddle images

    first = make(model, background, layer, batch_size=64, **settings).explain(images, 3, seeds)
    again = make(model, background, layer, batch_size=64, **settings).explain(images, 3, seeds)
    np.testing.assert_array_equal(first.values, again.values)

    small = make(model, background, layer, batch_size=7, **settings).explain(images, 3, seeds)
    np.testing.assert_allclose(small.values, first.values, rtol=1e-4, atol=1e-6)

    alone = make(model, background, layer, batch_size=7, **settings).explain(images[2:3], 3, seeds[2:3])
    np.testing.assert_allclose(alone.values[0], first.values[2], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(alone.classes[0], first.classes[2])

    other = make(model, background, layer, batch_size=64, **settings).explain(images, 3, [1, 2, 3, 4])
    assert not np.allclose(other.values, first.values)  # the seed matters


def test_completeness_at_input(model, data):
    background, images = data
    result = make(model, background, None, batch_size=512, nsamples=3000).explain(images, 2, [1, 2, 3, 4])
    expected = result.outputs - result.base_values
    assert np.abs(expected).min() > 0.3  # the check below is not vacuous
    np.testing.assert_allclose(result.shap_sum, expected, rtol=0.1, atol=0.05)
    np.testing.assert_allclose(result.shap_sum, result.values.sum(axis=(2, 3, 4)), rtol=1e-5, atol=1e-5)


def test_outputs_ranking_and_top_k_clamped(model, data):
    background, images = data
    explainer = make(model, background, None, batch_size=16, nsamples=8)
    result = explainer.explain(images, 10, [1, 2, 3, 4])

    with torch.no_grad():
        raw = model(images)
        background_mean = model(background).mean(0)
    assert result.classes.shape == (4, 5) and result.classes.dtype == np.int64
    assert result.values.shape == (4, 5, 3, 16, 16)
    for i in range(4):
        assert sorted(result.classes[i]) == list(range(5))
        assert np.all(np.diff(result.outputs[i]) <= 0)  # descending
    np.testing.assert_allclose(result.outputs, raw.gather(1, torch.from_numpy(result.classes)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(result.probabilities,
                               torch.softmax(raw, 1).gather(1, torch.from_numpy(result.classes)).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(result.base_values, background_mean[torch.from_numpy(result.classes)].numpy(),
                               rtol=1e-5, atol=1e-6)
    # no parameter gradients were taken, and the flags are back
    assert all(p.grad is None and p.requires_grad for p in model.parameters())

    # the background outputs are cached per explainer
    explainer.context.background = torch.zeros_like(background)
    again = explainer.explain(images[:1], 2, [1])
    np.testing.assert_allclose(again.base_values[0], result.base_values[0, :2], rtol=1e-6)


def test_settings_validation():
    assert gradient.Settings().nsamples == 200 and gradient.Settings().local_smoothing == 0.0
    with pytest.raises(ValidationError):
        gradient.Settings(nsamples=0)
    with pytest.raises(ValidationError):
        gradient.Settings(local_smoothing=-0.1)
    with pytest.raises(ValidationError):
        gradient.Settings(nsample=10)
    with pytest.raises(ValidationError):
        gradient.Settings(name="deep")


def test_layer_input_must_be_4d(model, data):
    background, images = data
    explainer = make(model, background, model.fc, nsamples=4)
    with pytest.raises(ConfigError) as info:
        explainer.explain(images[:2], 2, [1, 2])
    assert info.value.key == "model.layer"
    assert "4-D" in info.value.message
