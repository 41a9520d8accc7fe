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
    import shap
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
    from explain_cli import render
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
    assert s.sampling == "shap" and s.stability_from == "variance"
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
    ({"sampling": "uniform"}, "explainer.sampling", "'leverage'"),
    ({"stability_from": "bootstrap"}, "explainer.stability_from", "'split_half'"),
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


@pytest.mark.parametrize("stability_from, target", [("variance", 0.9993), ("split_half", 0.99)])
def test_auto_stops_each_image_at_the_target(model, stability_from, target):
    """About 60 superpixels: 256 coalitions are not enough for the target (the variance estimate is
    about 0.997-0.9995 there, and right: see test_variance_stability_is_the_rerun_correlation;
    split-half says 0.96-0.99)."""
    images = smooth_images(3, size=48)
    settings = dict(segments={"n_segments": 60, "compactness": 10, "sigma": 1}, nsamples="auto",
                    target_stability=target, max_nsamples=1024, stability_from=stability_from)
    result = make(model, **settings).explain(images, 2, [1, 2, 3])
    used = result.nsamples_used
    assert set(used) <= {256, 512, 1024} and used.max() > 256, (used, result.stability)
    for i in range(3):
        if result.nsamples_capped[i]:
            assert used[i] == 1024 and np.nanmin(result.stability[i]) < target
        else:
            assert np.nanmin(result.stability[i]) >= target
            if used[i] > 256:  # capped one round earlier (same draws), it had not reached the target
                earlier = make(model, **{**settings, "max_nsamples": int(used[i]) // 2}).explain(
                    images[i:i + 1], 2, [i + 1])
                assert earlier.nsamples_used[0] == used[i] // 2
                assert earlier.nsamples_capped[0] and np.nanmin(earlier.stability[0]) < target
    alone = make(model, batch_size=7, **settings).explain(images[1:2], 2, [2])
    assert alone.nsamples_used[0] == used[1]
    np.testing.assert_allclose(alone.values[0], result.values[1], rtol=1e-4, atol=1e-6)
    fixed = make(model, **{**settings, "nsamples": 300}).explain(images[:1], 2, [1])
    assert fixed.nsamples_used[0] == 300 and fixed.nsamples_capped is None


# -- Covert & Lee's variance estimate, leverage sampling ------------------------------------------------

def synthetic_game(m: int, seed: int = 0):
    """A non-additive game on 0/1 rows (two outputs): pairwise terms, a sine and a product of
    sums, so the sampled coalitions matter and paired sampling does not make it exact."""
    rng = np.random.default_rng(seed)
    a, c = rng.normal(size=m), rng.normal(size=m)
    b = rng.normal(size=(m, m)) * 0.3

    def v(z):
        z = np.asarray(z, np.float64)
        return np.stack([z @ a + np.einsum("si,ij,sj->s", z, b, z) + 2 * np.sin(z @ c),
                         3 * np.tanh(z @ c) + (z @ a) ** 2 / m], axis=1)

    return v


def estimate(v, m: int, n: int, seed: int, sampling: str = "shap"):
    """(phi (M, k), std (M, k)) of one seed's Kernel SHAP run on the game v."""
    sampler = kernel.CoalitionSampler(m, n, np.random.default_rng(seed), sampling)
    masks, weights = sampler.masks, sampler.weights
    y, ends = v(masks), v(np.stack([np.ones(m), np.zeros(m)]))
    phi = kernel.solve(masks, weights, y, ends[0], ends[1])
    cov = kernel.value_covariance(masks, weights, y, ends[0], ends[1], phi, sampler.unit_array())
    return phi, np.sqrt(np.einsum("kii->ik", cov))


@pytest.mark.parametrize("sampling", ["shap", "leverage"])
@pytest.mark.parametrize("m, n", [(16, 300), (40, 400)])
def test_value_std_agrees_with_the_spread_over_seeds(sampling, m, n):
    """Covert & Lee's estimate, from one run's coalitions, of the standard deviation of each value
    is the spread of the values over 300 seeds (every player within a factor 1.5, the median
    within 15%)."""
    v = synthetic_game(m)
    runs = [estimate(v, m, n, seed, sampling) for seed in range(300)]
    phis, stds = np.array([r[0] for r in runs]), np.array([r[1] for r in runs])
    ratio = stds.mean(0) / phis.std(0)
    assert phis.std(0).min() > 0.01  # the game is noisy at this budget: not vacuous
    assert np.all((ratio > 1 / 1.5) & (ratio < 1.5)), ratio
    assert 0.85 < np.median(ratio) < 1.15, np.median(ratio)


def test_value_std_is_zero_when_exact_and_std_ratio():
    v = synthetic_game(6)
    phi, std = estimate(v, 6, 1000, 0)  # 2**6 - 2 = 62 coalitions: all enumerated
    assert np.all(std == 0)
    phi = np.array([[1.0, 0.0], [3.0, 0.0]])
    np.testing.assert_allclose(kernel.std_ratio(phi, np.array([[0.1, 0.0], [0.3, 0.0]])), [0.15, np.nan])


def test_explain_writes_value_std_and_variance_stability_is_the_rerun_correlation(model):
    """Through explain(): ``value_std`` is painted per superpixel and agrees with the spread of the
    maps over seeds; the variance-based stability is the correlation of two seeds' maps (what
    stability means), closer to it than the split-half estimate."""
    x = smooth_images(1, size=48, seed=4)
    settings = dict(segments={"n_segments": 60, "compactness": 10, "sigma": 1}, nsamples=256)
    runs = [make(model, **settings).explain(x, 1, [seed]) for seed in range(30)]
    labels = runs[0].segments[0]
    maps = np.array([r.values[0, 0].sum(0) for r in runs])  # (seeds, H, W)
    std = np.array([r.value_std[0, 0] for r in runs])
    for label in np.unique(labels)[:5]:  # painted: one std per superpixel
        assert np.allclose(std[0][labels == label], std[0][labels == label][0])
    spread = maps.std(0)
    ratio = np.median(std.mean(0)[spread > 0] / spread[spread > 0])
    assert 1 / 1.5 < ratio < 1.5, ratio
    flat = maps.reshape(len(runs), -1)
    rerun = np.median(np.corrcoef(flat)[np.triu_indices(len(runs), 1)])
    assert rerun < 0.999  # the maps do differ between seeds
    variance = np.median([r.stability[0, 0] for r in runs])
    split = np.median([make(model, stability_from="split_half", **settings).explain(x, 1, [seed]).stability[0, 0]
                       for seed in range(10)])
    assert 1 / 1.5 < (1 - variance) / (1 - rerun) < 1.5, (variance, rerun)  # the noise share, within 1.5x
    assert abs(variance - rerun) < abs(split - rerun), (variance, split, rerun)


def test_leverage_sampler_draws_every_size_class_equally_and_weights_the_kernel():
    sampler = kernel.CoalitionSampler(20, 4000, np.random.default_rng(0), "leverage")
    masks, weights, nfixed = sampler.masks, sampler.weights, sampler.nfixed
    np.testing.assert_allclose(weights.sum(), 1.0)
    assert nfixed == 2 * 20 + 2 * 190  # shap's enumerated part (sizes 1, 19, 2, 18) is kept
    drawn = masks[nfixed:].sum(1)
    classes = np.minimum(drawn, 20 - drawn)  # a size and its complement's
    counts = np.bincount(drawn, minlength=21)[3:18]  # rows of each size 3..17
    assert counts.min() > 0.8 * counts.mean()  # uniform over the sizes (shap's are 4x apart)
    # the drawn mass of each size class is its Shapley kernel mass (importance weights)
    kernel_mass = np.array([(19.0 / (s * (20 - s))) * (1 if s == 10 else 2) for s in range(3, 11)])
    mass = np.array([weights[nfixed:][classes == s].sum() for s in range(3, 11)])
    np.testing.assert_allclose(mass / mass.sum(), kernel_mass / kernel_mass.sum(), rtol=0.2)
    assert sum(u[2] for u in sampler.units) >= len(sampler.units)  # repeats counted, not added as rows
    shap_sampler = kernel.CoalitionSampler(20, 4000, np.random.default_rng(0), "shap")
    shap_sizes = np.minimum(shap_sampler.masks[nfixed:].sum(1), 20 - shap_sampler.masks[nfixed:].sum(1))
    shap_counts = np.bincount(shap_sizes, minlength=11)[3:]
    assert shap_counts[0] > 2 * shap_counts[-1]  # the kernel favours small sizes; leverage does not


def test_leverage_converges_to_the_exact_shapley_values():
    """Consistent: at a large count (half of all coalitions) the leverage estimate is the exact
    Shapley value of a non-additive game, as shap's sampling is."""
    m = 12
    v = synthetic_game(m, seed=3)
    exact = exact_shapley(v, m)
    for sampling in ("shap", "leverage"):
        phi, std = estimate(v, m, 2000, 1, sampling)
        assert np.abs(phi - exact).max() < 0.05 * np.abs(exact).max(), sampling
        assert np.all(np.abs(phi - exact) < 5 * std + 1e-9), sampling  # within the estimated error


def test_leverage_agrees_with_shap_kernel_explainer_at_a_large_count(model, images):
    import shap
    nsamples = 3000
    result = make(model, segments={"n_segments": 16}, nsamples=nsamples, sampling="leverage").explain(
        images[:2], 2, [21, 22])
    for n in range(2):
        labels = result.segments[n]
        m = int(labels.max()) + 1
        assert 12 <= m <= 20 and nsamples < 2**m - 2
        f = game(model, images[n], labels, "mean", result.classes[n])
        np.random.seed(1)
        reference = shap.KernelExplainer(f, np.zeros((1, m)))
        values = np.asarray(reference.shap_values(np.ones((1, m)), nsamples=nsamples, l1_reg=False, silent=True))[0]
        ours = superpixel_values(result, n)
        for r in range(2):
            assert pearson(ours[:, r], values[:, r]) >= 0.99, (n, r)
        np.testing.assert_allclose(ours.sum(0), values.sum(0), atol=1e-4)


def test_resume_of_a_kernel_folder_from_before_the_new_keys():
    """An older kernel run.json lacks sampling and stability_from: sampling shap is what it did (no
    difference); the variance stability is a different column estimate (a difference, unless the
    rerun asks for split_half)."""
    from explain_cli import resume

    old = {"settings": {"explainer.name": "kernel", "explainer.nsamples": 1000}}
    new = {"settings": {**old["settings"], "explainer.sampling": "shap", "explainer.stability_from": "split_half"}}
    assert resume.differences(old, new) == []
    changed = {"settings": {**new["settings"], "explainer.stability_from": "variance", "explainer.sampling": "leverage"}}
    diffs = resume.differences(old, changed)
    assert len(diffs) == 2 and any("stability_from" in d for d in diffs) and any("leverage" in d for d in diffs)


def test_variance_stability_needs_more_draws_than_superpixels(model):
    """Fewer draws than free values: no variance estimate (blank stability), and nsamples auto
    keeps drawing rather than stopping on it."""
    x = smooth_images(1, size=48)
    settings = dict(segments={"n_segments": 60, "compactness": 10, "sigma": 1})
    few = make(model, nsamples=60, **settings).explain(x, 1, [1])
    assert int(few.segments.max()) + 1 > 40 and np.isnan(few.stability[0, 0])
    assert np.isfinite(make(model, nsamples=60, stability_from="split_half", **settings).explain(x, 1, [1]).stability[0, 0])
    auto = make(model, nsamples="auto", max_nsamples=40, **settings).explain(x, 1, [1])  # capped before estimable
    assert auto.nsamples_used[0] == 40 and auto.nsamples_capped[0]
