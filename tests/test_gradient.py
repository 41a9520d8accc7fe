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
    import shap
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


# -- estimators: balanced references, stratified t, unbiasedness ------------------------------------

@pytest.mark.parametrize("n,refs", [(30, 10), (25, 10), (7, 10), (1, 3), (64, 3)])
def test_stratified_design_is_balanced(n, refs):
    rind, t = gradient.draw_design(n, refs, torch.Generator().manual_seed(n), stratified=True)
    assert rind.shape == t.shape == (n,)
    counts = torch.bincount(rind, minlength=refs)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n  # every reference equally often (+-1)
    assert ((t >= 0) & (t < 1)).all()
    if n >= refs:  # each reference's c draws: one t in each of [j/c, (j+1)/c)
        for b in range(refs):
            own = t[rind == b]
            assert sorted((own * len(own)).floor().long().tolist()) == list(range(len(own)))
    else:  # distinct references, t stratified over all n
        assert len(set(rind.tolist())) == n
        assert sorted((t * n).floor().long().tolist()) == list(range(n))


def midpoint_truth(model, background, x, layer=None, path="input", points=200):
    """Expected gradients by quadrature: every reference with `points` midpoints of t (deterministic)."""
    original = gradient.draw_design

    def midpoints(n, n_refs, generator, stratified):
        per = n // n_refs
        return (torch.arange(n_refs).repeat_interleave(per),
                ((torch.arange(per, dtype=torch.float64) + 0.5) / per).repeat(n_refs))

    gradient.draw_design = midpoints
    try:
        return make(model, background, layer, batch_size=1000, nsamples=2 * points * background.shape[0],
                    path=path).explain(x, 1, [0] * x.shape[0])
    finally:
        gradient.draw_design = original


@pytest.mark.parametrize("target", ["input", "layer"])
def test_stratified_estimator_is_unbiased(model, data, target):
    """The mean of many small stratified estimates is the quadrature value (an estimator with a bias
    would stay off it however many seeds are averaged), and it is closer at each seed than shap's
    independent draws at the same count."""
    background, images = data
    x = images[:1]
    layer = None if target == "input" else model.conv2
    truth = midpoint_truth(model, background, x, layer).values[0, 0]
    seeds = 32
    # 40 samples: each half (20) goes twice round the 10 references, so t is stratified per reference
    estimates = {s: np.stack([make(model, background, layer, nsamples=40, path="input", sampling=s)
                              .explain(x, 1, [seed]).values[0, 0] for seed in range(seeds)])
                 for s in ("stratified", "random")}
    mean = estimates["stratified"].mean(0)
    stderr = estimates["stratified"].std(0, ddof=1) / np.sqrt(seeds)
    z = (mean - truth) / np.maximum(stderr, 1e-12)
    assert np.abs(z).mean() < 1.2 and np.abs(z).max() < 6  # |N(0,1)| has mean 0.8
    error = {s: np.mean([np.abs(e - truth).sum() for e in v]) for s, v in estimates.items()}
    assert error["stratified"] < 0.8 * error["random"], error


@pytest.mark.parametrize("target", ["input", "layer"])
def test_stratified_agrees_with_shap_at_a_large_count(model, data, target):
    import shap
    background, images = data
    x = images[[0, 2]]
    layer = None if target == "input" else model.conv2
    ours = make(model, background, layer, batch_size=1000, nsamples=2000, path="input").explain(x, 2, [5, 6])
    reference = shap.GradientExplainer(model if layer is None else (model, layer), background)
    values, indexes = reference.shap_values(x, ranked_outputs=2, nsamples=8000, rseed=3)
    values = np.moveaxis(np.asarray(values), -1, 1)
    np.testing.assert_array_equal(ours.classes, indexes.numpy())
    for i in range(2):
        for r in range(2):
            assert pearson(ours.values[i, r], values[i, r]) >= 0.99, (i, r)


# -- path: layer -------------------------------------------------------------------------------------

class Residual(nn.Module):
    """conv_a's input h also reaches the output through a skip that bypasses conv_a."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = torch.relu(self.conv_b(torch.relu(self.conv_a(h))) + h)
        return self.head(y.mean((2, 3)))


@pytest.fixture(scope="module")
def residual():
    torch.manual_seed(3)
    net = Residual().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2)
    return net


def with_layer_input(model, layer, x, h):
    handle = layer.register_forward_pre_hook(lambda module, args: (h,) + tuple(args[1:]))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


def test_layer_path_is_complete_on_a_residual_network(residual, data):
    background, images = data
    layer = residual.conv_a
    result = make(residual, background, layer, batch_size=512, nsamples=512).explain(images, 2, [1, 2, 3, 4])
    assert result.values.shape == (4, 2, 8, 16, 16)

    # base value: E_b f(x with conv_a's input h(b)), the skip keeping x's h; not E_b f(b) here
    with torch.no_grad():
        h_bg = torch.relu(residual.stem(background))
        f_bg = residual(background).mean(0)
    for i in range(4):
        starts = torch.stack([with_layer_input(residual, layer, images[i:i + 1], h_bg[b:b + 1])[0]
                              for b in range(background.shape[0])]).mean(0)
        np.testing.assert_allclose(result.base_values[i], starts[result.classes[i]].numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(result.base_values - f_bg[torch.from_numpy(result.classes)].numpy()).max() > 0.05

    # completeness: the values add up to output - base_value (Monte-Carlo error only)
    expected = result.outputs - result.base_values
    assert np.abs(expected).max() > 0.5
    relative = result.additivity_error / np.maximum(np.abs(expected), 0.1)
    assert relative.max() <= 0.01, relative
    np.testing.assert_allclose(result.shap_sum, result.values.sum(axis=(2, 3, 4)), rtol=1e-5, atol=1e-5)
    # shap's convention at the same layer is not complete (the reason for path: layer)
    shap_style = make(residual, background, layer, batch_size=512, nsamples=512, path="input").explain(
        images, 2, [1, 2, 3, 4])
    assert np.median(shap_style.additivity_error) > 0.1 > 100 * np.median(result.additivity_error)


def test_layer_path_is_complete_on_resnet18(data):
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    background, images = data
    background = nn.functional.interpolate(background[:4], size=32)
    images = nn.functional.interpolate(images[:2], size=32)
    context = ExplainContext(model=net, layer=net.layer2[0].conv1, layer_name="layer2.0.conv1",
                             background=background, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                             device=torch.device("cpu"), batch_size=256, settings=gradient.Settings(nsamples=256))
    result = gradient.Explainer(context).explain(images, 2, [1, 2])
    relative = result.additivity_error / np.abs(result.outputs - result.base_values)
    assert np.median(relative) <= 0.05, relative


# -- nsamples: auto -------------------------------------------------------------------------------------

def test_auto_rounds():
    assert gradient.round_sizes(gradient.Settings(nsamples=50)) == [50]
    sizes = gradient.round_sizes(gradient.Settings(nsamples="auto"))
    assert sizes[:4] == [32, 32, 64, 128] and sum(sizes) == 2000
    assert gradient.round_sizes(gradient.Settings(nsamples="auto", max_nsamples=20)) == [20]
    with pytest.raises(ValidationError):
        gradient.Settings(nsamples="many")
    with pytest.raises(ValidationError):
        gradient.Settings(target_stability=1.0)


def test_auto_stops_each_image_at_the_target(model, data):
    background, images = data
    seeds = [7, 8, 9, 10]
    settings = dict(nsamples="auto", target_stability=0.995, max_nsamples=1024)
    result = make(model, background, None, **settings).explain(images, 2, seeds)
    used = result.nsamples_used
    assert set(used) <= {32, 64, 128, 256, 512, 1024} and len(set(used)) > 1, used  # per image, not per batch
    for i in range(4):
        if result.nsamples_capped[i]:
            assert used[i] == 1024 and np.nanmin(result.stability[i]) < 0.995
        else:
            assert np.nanmin(result.stability[i]) >= 0.995
            if used[i] > 32:  # one round earlier (same draws: cap it there) it had not reached the target
                earlier = make(model, background, None, **{**settings, "max_nsamples": int(used[i]) // 2}).explain(
                    images[i:i + 1], 2, seeds[i:i + 1])
                assert earlier.nsamples_capped[0] and np.nanmin(earlier.stability[0]) < 0.995
    # an image's rounds depend only on its own seed: alone it stops where it stopped in the batch
    alone = make(model, background, None, batch_size=7, **settings).explain(images[2:3], 2, seeds[2:3])
    assert alone.nsamples_used[0] == used[2]
    np.testing.assert_allclose(alone.values[0], result.values[2], rtol=1e-4, atol=1e-6)

    fixed = make(model, background, None, nsamples=40).explain(images, 2, seeds)
    assert list(fixed.nsamples_used) == [40] * 4 and fixed.nsamples_capped is None
