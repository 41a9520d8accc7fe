"""The kernel (Kernel SHAP over superpixels) explainer: exact Shapley values, agreement with shap,
efficiency, seeding, fills, settings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from explain_cli import masking
from explain_cli.config import validate_explainer
from explain_cli.errors import ConfigError
from explain_cli.explainers import kernel
from explain_cli.explainers.base import ExplainContext

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():  # larger weights: outputs spread over a few units
        for p in net.parameters():
            p.mul_(3)
    return net


def smooth_images(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    """Smooth random 8-bit images (so SLIC finds real regions), normalised like the pipeline does."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 1, (n, 3, 5, 5)).astype(np.float32)
    up = torch.nn.functional.interpolate(torch.from_numpy(low), size=size, mode="bicubic", align_corners=True)
    pixels = np.clip(np.rint(up.numpy() * 255), 0, 255) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    return torch.from_numpy(((pixels - mean) / std).astype(np.float32))


@pytest.fixture(scope="module")
def images():
    return smooth_images(3)


def make(model, batch_size=256, **settings):
    context = ExplainContext(
        model=model, layer=None, layer_name="input", background=torch.zeros(1, 3, 32, 32),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, device=torch.device("cpu"), batch_size=batch_size,
        settings=kernel.Settings(**settings))
    return kernel.Explainer(context)


def superpixel_values(result, n: int) -> np.ndarray:
    """(M, k) superpixel values read back from the painted map (channel sum at a segment's pixels)."""
    labels = result.segments[n]
    per_pixel = result.values[n].sum(1)  # (k, H, W)
    m = int(labels.max()) + 1
    first = np.array([np.flatnonzero(labels.ravel() == j)[0] for j in range(m)])
    return per_pixel.reshape(per_pixel.shape[0], -1)[:, first].T


def game(model, image: torch.Tensor, labels: np.ndarray, fill, classes: np.ndarray):
    """v(z) for 0/1 coalition rows z (rows, M): the model outputs of ``classes`` for the image with
    the superpixels where z == 0 replaced by the fill image, built with the module's own helpers."""
    pixels = masking.to_pixels(image[None], IMAGENET_MEAN, IMAGENET_STD)[0]
    fill_image = masking.normalise(masking.fill_pixels(pixels, fill), IMAGENET_MEAN, IMAGENET_STD).to(image.dtype)
    labels_t = torch.from_numpy(labels)

    def f(z):
        shown = torch.from_numpy(np.asarray(z) > 0.5)[:, labels_t]  # (rows, H, W)
        outs = []
        with torch.no_grad():
            for a in range(0, shown.shape[0], 512):
                masked = torch.where(shown[a:a + 512, None], image, fill_image)
                outs.append(model(masked)[:, torch.from_numpy(classes)].double())
        return torch.cat(outs).numpy()

    return f


def exact_shapley(f, m: int) -> np.ndarray:
    """Exact Shapley values (M, k) of the game f by enumerating all 2**M coalitions."""
    coalitions = np.array(list(itertools.product([0, 1], repeat=m)), dtype=np.float64)
    v = f(coalitions)
    index = {tuple(c.astype(int)): i for i, c in enumerate(coalitions)}
    phi = np.zeros((m, v.shape[1]))
    for i, c in enumerate(coalitions):
        s = int(c.sum())
        for j in range(m):
            if c[j] == 0:
                with_j = c.copy()
                with_j[j] = 1
                weight = math.factorial(s) * math.factorial(m - s - 1) / math.factorial(m)
                phi[j] += weight * (v[index[tuple(with_j.astype(int))]] - v[i])
    return phi


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


# -- exactness -----------------------------------------------------------------------------------

def test_exact_on_a_linear_model():
    """Additive game: each superpixel's value is its own contribution W . (x - fill) over its pixels."""
    torch.manual_seed(3)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)).double().eval()
    x = smooth_images(2, seed=5).double()
    explainer = make(linear, segments={"n_segments": 10}, nsamples=5000, fill=[255, 0, 128])
    result = explainer.explain(x, 3, [1, 2])
    for n in range(2):
        labels = result.segments[n]
        m = int(labels.max()) + 1
        assert 4 <= m <= 12
        pixels = masking.to_pixels(x[n:n + 1], IMAGENET_MEAN, IMAGENET_STD)[0]
        fill = masking.normalise(masking.fill_pixels(pixels, [255, 0, 128]), IMAGENET_MEAN, IMAGENET_STD).double()
        weight = linear[1].weight.detach().view(4, 3, 32, 32)[torch.from_numpy(result.classes[n])]
        contribution = (weight * (x[n] - fill)).sum(1).numpy()  # (k, H, W)
        expected = np.stack([np.bincount(labels.ravel(), weights=contribution[r].ravel(), minlength=m)
                             for r in range(3)], axis=1)
        np.testing.assert_allclose(superpixel_values(result, n), expected, atol=1e-5)


def test_exact_shapley_values_when_all_coalitions_fit(model):
    """With nsamples >= 2**M - 2 every coalition is enumerated: Kernel SHAP = exact Shapley values,
    here of a non-additive game (a CNN)."""
    net = TinyNet().double().eval()
    net.load_state_dict(model.state_dict())
    x = smooth_images(2, seed=7).double()
    result = make(net, segments={"n_segments": 6, "compactness": 20}, nsamples=1000).explain(x, 2, [3, 4])
    for n in range(2):
        m = int(result.segments[n].max()) + 1
        assert 3 <= m <= 9
        f = game(net, x[n], result.segments[n], "mean", result.classes[n])
        expected = exact_shapley(f, m)
        assert np.abs(expected).max() > 0.05  # not vacuous
        np.testing.assert_allclose(superpixel_values(result, n), expected, atol=1e-5)
        np.testing.assert_allclose(result.base_values[n], f(np.zeros((1, m)))[0], atol=1e-5)


def test_grid_players_give_exact_shapley_values(model):
    """segments: {grid: G}: the same G x G patches for every image; with nsamples >= 2**(G*G) - 2
    the values are the exact Shapley values over those patches."""
    labels = masking.grid_labels(10, 10, 3)
    np.testing.assert_array_equal(labels[:, 0], [0] * 4 + [3] * 3 + [6] * 3)  # bands of 4, 3, 3 rows
    np.testing.assert_array_equal(labels[0], [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    net = TinyNet().double().eval()
    net.load_state_dict(model.state_dict())
    x = smooth_images(2, seed=9).double()
    result = make(net, segments={"grid": 3}, nsamples=600).explain(x, 2, [1, 2])
    grid = masking.grid_labels(32, 32, 3)
    for n in range(2):
        np.testing.assert_array_equal(result.segments[n], grid)
        f = game(net, x[n], grid, "mean", result.classes[n])
        expected = exact_shapley(f, 9)
        assert np.abs(expected).max() > 0.05  # not vacuous
        np.testing.assert_allclose(superpixel_values(result, n), expected, atol=1e-5)


def test_grid_and_slic_keys_are_exclusive():
    assert kernel.Settings(segments={"grid": 4}).segments.grid == 4
    dumped = kernel.Settings(segments={"grid": 4}).model_dump(mode="json")
    assert kernel.Settings.model_validate(dumped).segments.grid == 4  # run.json round trip
    with pytest.raises(ConfigError) as info:
        validate_explainer({"name": "kernel", "segments": {"grid": 4, "n_segments": 10}}, "cfg.yaml")
    assert info.value.key.startswith("explainer.segments") and "grid" in info.value.message
    with pytest.raises(ConfigError) as info:
        validate_explainer({"name": "kernel", "segments": {"grid": 0}}, "cfg.yaml")
    assert info.value.key == "explainer.segments.grid"


# -- agreement with shap -------------------------------------------------------------------------

def test_agrees_with_shap_kernel_explainer(model, images):
    shap = pytest.importorskip("shap")
    nsamples = 1500
    result = make(model, segments={"n_segments": 16}, nsamples=nsamples).explain(images[:2], 2, [11, 12])
    for n in range(2):
        labels = result.segments[n]
        m = int(labels.max()) + 1
        assert 10 <= m <= 20 and nsamples < 2**m - 2  # the random part of the sampling is used
        f = game(model, images[n], labels, "mean", result.classes[n])
        np.random.seed(0)  # shap draws from numpy's global generator
        reference = shap.KernelExplainer(f, np.zeros((1, m)))
        values = reference.shap_values(np.ones((1, m)), nsamples=nsamples, l1_reg=False, silent=True)
        values = np.asarray(values)[0]  # (M, k)
        ours = superpixel_values(result, n)
        assert ours.shape == values.shape == (m, 2)
        np.testing.assert_allclose(reference.expected_value, result.base_values[n], atol=1e-5)
        scale = np.abs(values).max()
        for r in range(2):
            assert pearson(ours[:, r], values[:, r]) >= 0.95, (n, r)
        assert np.abs(ours - values).max() <= 0.1 * scale
        np.testing.assert_allclose(ours.sum(0), values.sum(0), atol=1e-4)  # both satisfy efficiency


# -- efficiency, outputs, painting ---------------------------------------------------------------

def test_efficiency_outputs_and_painting(model, images):
    result = make(model, segments={"n_segments": 12}, nsamples=300).explain(images, 3, [1, 2, 3])
    with torch.no_grad():
        raw = model(images)
    assert result.values.shape == (3, 3, 3, 32, 32) and result.values.dtype == np.float32
    assert result.segments.shape == (3, 32, 32)
    np.testing.assert_allclose(result.outputs, raw.gather(1, torch.from_numpy(result.classes)).numpy(), atol=1e-5)
    np.testing.assert_allclose(result.probabilities,
                               torch.softmax(raw, 1).gather(1, torch.from_numpy(result.classes)).numpy(), atol=1e-6)
    for n in range(3):
        assert np.all(np.diff(result.outputs[n]) <= 0)
        # base value = output of the all-hidden (mean-colour) image
        pixels = masking.to_pixels(images[n:n + 1], IMAGENET_MEAN, IMAGENET_STD)[0]
        fill = masking.normalise(masking.fill_pixels(pixels, "mean"), IMAGENET_MEAN, IMAGENET_STD)
        with torch.no_grad():
            hidden = model(fill[None])[0, torch.from_numpy(result.classes[n])].numpy()
        np.testing.assert_allclose(result.base_values[n], hidden, atol=1e-5)
        # each pixel carries its superpixel's value, split evenly over the channels
        labels = result.segments[n]
        phi = superpixel_values(result, n)  # (M, k)
        np.testing.assert_allclose(result.values[n], np.broadcast_to(
            (phi / 3)[labels].transpose(2, 0, 1)[:, None], (3, 3, 32, 32)), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(phi.sum(0), result.shap_sum[n], atol=1e-5)
    expected = result.outputs - result.base_values
    assert np.abs(expected).min() > 0.01  # not vacuous
    np.testing.assert_allclose(result.shap_sum, expected, atol=1e-5)
    assert result.additivity_error.max() < 1e-5


def test_painted_map_is_what_the_renderer_fills(model, images):
    render = pytest.importorskip("explain_cli.render")
    result = make(model, segments={"n_segments": 12}, nsamples=100).explain(images[:1], 2, [1])
    maps = result.values[0].sum(1)  # the renderer's channel sum
    np.testing.assert_allclose(render.segment_fill(maps, result.segments[0]), maps, rtol=1e-5, atol=1e-7)


def test_top_k_clamped_and_single_superpixel(model):
    x = smooth_images(1, seed=9)
    result = make(model, segments={"n_segments": 1}, nsamples=50, fill=0).explain(x, 10, [1])
    assert result.classes.shape == (1, 5) and sorted(result.classes[0]) == list(range(5))
    assert int(result.segments.max()) == 0
    np.testing.assert_allclose(result.shap_sum, result.outputs - result.base_values, atol=1e-5)


def test_layer_target_is_a_config_error(model, images):
    context = ExplainContext(
        model=model, layer=model.conv2, layer_name="conv2", background=images, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, device=torch.device("cpu"), batch_size=8, settings=kernel.Settings(nsamples=10))
    with pytest.raises(ConfigError) as info:
        kernel.Explainer(context)
    assert info.value.key == "model.layer" and "input" in info.value.message


# -- sampling and seeds --------------------------------------------------------------------------

def test_sampling_matches_shap_enumeration():
    """Small budgets: sizes enumerated like shap (M=10, 100 samples: size 1 and complements, 20 rows)."""
    masks, weights = kernel.sample_coalitions(10, 100, np.random.default_rng(0))
    assert masks.shape == (100, 10) and len({m.tobytes() for m in masks}) == 100
    sizes = masks.sum(1)
    assert set(sizes[:20]) == {1, 9}
    assert np.all((sizes[20:] >= 2) & (sizes[20:] <= 8))
    np.testing.assert_allclose(weights.sum(), 1.0)
    masks, weights = kernel.sample_coalitions(6, 10_000, np.random.default_rng(0))
    assert masks.shape == (62, 6) and len({m.tobytes() for m in masks}) == 62  # capped at 2**M - 2


def test_seeded_and_batch_independent(model, images):
    settings = dict(segments={"n_segments": 16}, nsamples=120)
    seeds = [101, 202, 303]
    first = make(model, batch_size=256, **settings).explain(images, 2, seeds)
    again = make(model, batch_size=256, **settings).explain(images, 2, seeds)
    np.testing.assert_array_equal(first.values, again.values)

    small = make(model, batch_size=7, **settings).explain(images, 2, seeds)  # chunks straddle images
    np.testing.assert_allclose(small.values, first.values, rtol=1e-4, atol=1e-6)

    alone = make(model, batch_size=7, **settings).explain(images[1:2], 2, seeds[1:2])
    np.testing.assert_allclose(alone.values[0], first.values[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(alone.segments[0], first.segments[1])

    other = make(model, batch_size=256, **settings).explain(images, 2, [1, 2, 3])
    assert not np.allclose(other.values, first.values)  # the seed matters


def test_images_per_step():
    net = TinyNet().eval()
    assert make(net, batch_size=64, nsamples=1000).images_per_step == 1
    assert make(net, batch_size=64, nsamples=20).images_per_step == 8
    assert make(net, batch_size=64, nsamples=99).images_per_step == 3


# -- fills ---------------------------------------------------------------------------------------

def test_fill_images():
    import cv2

    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (12, 10, 3)).astype(np.float32)
    mean_fill = masking.fill_pixels(pixels, "mean")
    np.testing.assert_allclose(mean_fill, np.broadcast_to(pixels.mean((0, 1)), pixels.shape), atol=1e-6)
    np.testing.assert_allclose(masking.fill_pixels(pixels, [255.0, 0.0, 51.0])[3, 4], [1.0, 0.0, 0.2], atol=1e-6)
    blurred = masking.fill_pixels(pixels, "blur(5,3)")
    np.testing.assert_allclose(blurred, cv2.blur(pixels, (5, 3)), atol=1e-6)
    assert not np.allclose(blurred, masking.fill_pixels(pixels, "blur(3,5)"))


def test_fill_changes_base_value(model, images):
    x = images[:1]
    white = make(model, segments={"n_segments": 8}, nsamples=30, fill=255).explain(x, 1, [1])
    blur = make(model, segments={"n_segments": 8}, nsamples=30, fill="blur(9, 9)").explain(x, 1, [1])
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ones = (torch.ones(1, 3, 32, 32) - mean) / std
    with torch.no_grad():
        expected = model(ones)[0, int(white.classes[0, 0])].item()
    assert white.base_values[0, 0] == pytest.approx(expected, abs=1e-5)
    assert abs(blur.base_values[0, 0] - white.base_values[0, 0]) > 1e-3
    np.testing.assert_allclose(blur.shap_sum, blur.outputs - blur.base_values, atol=1e-5)


# -- settings ------------------------------------------------------------------------------------

def test_settings_defaults_and_forms():
    s = kernel.Settings()
    assert (s.segments.n_segments, s.segments.compactness, s.segments.sigma) == (50, 30.0, 3.0)
    assert s.nsamples == 1000 and s.fill == "mean"
    assert kernel.Settings(fill=128).fill == [128.0, 128.0, 128.0]
    assert kernel.Settings(fill=[10, 20, 30]).fill == [10.0, 20.0, 30.0]
    assert kernel.Settings(fill=" blur( 5 ,7) ").fill == "blur(5,7)"
    # the canonical forms survive a dump / validate round trip (run.json, validate)
    dumped = kernel.Settings(fill="blur(5,7)", segments={"n_segments": 20}).model_dump(mode="json")
    assert kernel.Settings.model_validate(dumped).model_dump(mode="json") == dumped
    with pytest.raises(ValidationError):
        kernel.Settings(name="gradient")


@pytest.mark.parametrize("section, key, words", [
    ({"fill": "meen"}, "explainer.fill", "'mean'"),
    ({"fill": [1, 2]}, "explainer.fill", "3 numbers"),
    ({"fill": [0, 0, 300]}, "explainer.fill", "0-255"),
    ({"fill": True}, "explainer.fill", "blur(KX,KY)"),
    ({"fill": "blur(0,3)"}, "explainer.fill", ">= 1"),
    ({"nsamples": 0}, "explainer.nsamples", ">= 1"),
    ({"segments": {"n_segments": 0}}, "explainer.segments.n_segments", ">= 1"),
    ({"segments": {"compactness": 0}}, "explainer.segments.compactness", "> 0"),
    ({"segments": {"sigma": -1}}, "explainer.segments.sigma", ">= 0"),
    ({"segments": {"n_segment": 10}}, "explainer.segments.n_segment", "did you mean 'n_segments'"),
    ({"l1_reg": 0.1}, "explainer.l1_reg", "unknown key"),
])
def test_settings_errors_name_the_key(section, key, words):
    with pytest.raises(ConfigError) as info:
        validate_explainer({"name": "kernel", **section}, "cfg.yaml")
    assert info.value.key == key
    assert words in info.value.message


def test_example_config_validates():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "kernel.yaml"
    data = yaml.safe_load(path.read_text())
    settings = validate_explainer(data["explainer"], str(path))
    assert settings.name == "kernel" and settings.fill == "mean"
    assert settings.segments.n_segments == 50


# -- nsamples: auto -----------------------------------------------------------------------------------

def test_sampler_draws_more_from_the_same_distribution():
    """Drawing later continues the random part: the first rows stay, the drawn weights are rescaled to
    the kernel mass left, complements stay paired, and no coalition appears twice."""
    sampler = kernel.CoalitionSampler(12, 100, np.random.default_rng(0))
    first = sampler.masks.copy()
    assert sampler.draw(200) == 200
    masks, weights = sampler.masks, sampler.weights
    assert masks.shape == (300, 12) and np.array_equal(masks[:100], first)
    assert len({m.tobytes() for m in masks}) == 300
    np.testing.assert_allclose(weights.sum(), 1.0)
    drawn = masks[sampler.nfixed:]
    pairs = sum(np.array_equal(drawn[j], ~drawn[j - 1]) for j in range(1, len(drawn)))
    assert pairs >= 0.4 * len(drawn)  # paired (antithetic) coalitions
    small = kernel.CoalitionSampler(4, 4, np.random.default_rng(0))  # 2**4 - 2 = 14 coalitions at most
    assert small.draw(100) <= 10 and small.masks.shape[0] <= 14


def test_auto_stops_each_image_at_the_target(model):
    images = smooth_images(3, size=48)  # about 60 superpixels: 256 coalitions are not enough for 0.99
    settings = dict(segments={"n_segments": 60, "compactness": 10, "sigma": 1}, nsamples="auto",
                    target_stability=0.99, max_nsamples=1024)
    result = make(model, **settings).explain(images, 2, [1, 2, 3])
    used = result.nsamples_used
    assert set(used) <= {256, 512, 1024} and used.max() > 256, (used, result.stability)
    for i in range(3):
        if result.nsamples_capped[i]:
            assert used[i] == 1024 and np.nanmin(result.stability[i]) < 0.99
        else:
            assert np.nanmin(result.stability[i]) >= 0.99
            if used[i] > 256:  # capped one round earlier (same draws), it had not reached the target
                earlier = make(model, **{**settings, "max_nsamples": int(used[i]) // 2}).explain(
                    images[i:i + 1], 2, [i + 1])
                assert earlier.nsamples_used[0] == used[i] // 2
                assert earlier.nsamples_capped[0] and np.nanmin(earlier.stability[0]) < 0.99
    alone = make(model, batch_size=7, **settings).explain(images[1:2], 2, [2])
    assert alone.nsamples_used[0] == used[1]
    np.testing.assert_allclose(alone.values[0], result.values[1], rtol=1e-4, atol=1e-6)
    fixed = make(model, **{**settings, "nsamples": 300}).explain(images[:1], 2, [1])
    assert fixed.nsamples_used[0] == 300 and fixed.nsamples_capped is None
