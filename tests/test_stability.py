"""Stability (split-half reliability): the formula, and agreement with real reruns at other seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from explain_cli import stability
from explain_cli.explainers import base, deep, gradient, kernel, partition

REPO = Path(__file__).resolve().parents[1]


def rerun_correlation(maps: list[np.ndarray]) -> np.ndarray:
    """Pairwise Pearson correlations (upper triangle) of channel-summed maps of independent runs."""
    flat = np.stack([m.sum(0).ravel() for m in maps])
    c = np.corrcoef(flat)
    return c[np.triu_indices(len(maps), 1)]


def test_spearman_brown_predicts_the_correlation_of_two_full_estimates():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(1, 1, 2, 40, 40))
    n, sigma = 16, 3.0
    draws = truth + sigma * rng.normal(size=(n, 1, 1, 2, 40, 40))
    half_a, half_b = draws[: n // 2].sum(0), draws[n // 2:].sum(0)
    got = stability.split_half_stability(torch.from_numpy(half_a), torch.from_numpy(2.5 * half_b))[0, 0]
    v = truth.sum(2).var()
    noise = 2 * sigma**2 / n  # variance of the channel sum of a mean of n draws (2 channels)
    assert got == pytest.approx(v / (v + noise), abs=0.03)
    assert stability.split_half_stability(torch.from_numpy(half_a), torch.from_numpy(half_a))[0, 0] == pytest.approx(1)
    # unequal halves (3 and 9 draws) predict the whole of 12 draws
    uneven = stability.split_half_stability(torch.from_numpy(draws[:3].sum(0)), torch.from_numpy(draws[3:12].sum(0)),
                                          (3, 9))[0, 0]
    assert uneven == pytest.approx(v / (v + 2 * sigma**2 / 12), abs=0.03)
    np.testing.assert_allclose(stability.spearman_brown(np.array([0.3, 0.8]), (1000, 1001)),
                               stability.spearman_brown(np.array([0.3, 0.8])), rtol=1e-3)
    constant = torch.ones(1, 1, 2, 4, 4, dtype=torch.float64)
    assert np.isnan(stability.split_half_stability(constant, constant)[0, 0])
    np.testing.assert_allclose(stability.spearman_brown(np.array([0.5, 0.0, -0.3, 1.0])), [2 / 3, 0, -0.3, 1])


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3)).eval()


def context(model, background, settings) -> base.ExplainContext:
    return base.ExplainContext(model=model, layer=None, layer_name="input", background=background,
                               mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), device=torch.device("cpu"),
                               batch_size=256, settings=settings)


def test_gradient_stability_matches_reruns_on_a_tiny_model():
    torch.manual_seed(1)
    model, x, background = tiny_model(), torch.randn(1, 3, 16, 16), torch.randn(12, 3, 16, 16)
    means = []
    for n in (2, 64):
        explainer = gradient.Explainer(context(model, background, gradient.Settings(nsamples=n)))
        runs = [explainer.explain(x, 1, [seed]) for seed in range(12)]
        stability = np.array([r.stability[0, 0] for r in runs])
        rerun = rerun_correlation([r.values[0, 0] for r in runs])
        means.append(stability.mean())
        # within sampling error: 3 standard errors of the difference of the two means
        se = np.hypot(stability.std(ddof=1) / np.sqrt(len(runs)), rerun.std(ddof=1) / np.sqrt(len(runs)))
        assert abs(stability.mean() - rerun.mean()) < 3 * se + 0.02, (n, stability.mean(), rerun.mean(), se)
    assert means[1] > means[0] + 0.2


def test_deep_stability_over_background_halves():
    torch.manual_seed(2)
    model, x = tiny_model(), torch.randn(2, 3, 12, 12)
    pool = torch.randn(64, 3, 12, 12)
    runs = []
    for start in range(0, 64, 8):  # eight independent backgrounds of 8 images
        explainer = deep.Explainer(context(model, pool[start:start + 8], deep.Settings()))
        runs.append(explainer.explain(x, 1, [0, 1]))
    for i in range(2):
        stability = np.array([r.stability[i, 0] for r in runs])
        rerun = rerun_correlation([r.values[i, 0] for r in runs])
        se = np.hypot(stability.std(ddof=1) / np.sqrt(len(runs)), rerun.std(ddof=1) / np.sqrt(len(runs)))
        assert abs(stability.mean() - rerun.mean()) < 3 * se + 0.02, (stability.mean(), rerun.mean(), se)
    single = deep.Explainer(context(model, pool[:1], deep.Settings())).explain(x, 1, [0, 1])
    assert single.stability is None  # one reference: nothing to split


@pytest.mark.parametrize("stability_from", ["variance", "split_half"])
def test_kernel_stability_matches_reruns_and_is_one_when_exact(stability_from):
    torch.manual_seed(3)
    model = tiny_model()
    x = torch.randn(1, 3, 24, 24)
    segments = kernel.SegmentSettings(n_segments=12, compactness=10, sigma=1)
    runs = []
    for seed in range(10):
        settings = kernel.Settings(nsamples=120, segments=segments, stability_from=stability_from)
        runs.append(kernel.Explainer(context(model, torch.zeros(0, 3, 24, 24), settings)).explain(x, 1, [seed]))
    stability = np.array([r.stability[0, 0] for r in runs])
    rerun = rerun_correlation([r.values[0, 0] for r in runs])
    se = np.hypot(stability.std(ddof=1) / np.sqrt(len(runs)), rerun.std(ddof=1) / np.sqrt(len(runs)))
    assert abs(stability.mean() - rerun.mean()) < 3 * se + 0.02, (stability.mean(), rerun.mean(), se)
    exact = kernel.Explainer(context(model, torch.zeros(0, 3, 24, 24),
                                     kernel.Settings(nsamples=100_000, segments=segments,
                                                     stability_from=stability_from))).explain(x, 1, [0])
    assert exact.stability[0, 0] == 1.0


def test_kernel_split_keeps_the_enumerated_rows_and_pairs():
    masks, weights, nfixed = kernel.sample_coalitions_split(10, 300, np.random.default_rng(0))
    assert 0 < nfixed < masks.shape[0]
    halves = kernel.split_half(masks, weights, nfixed)
    for w in halves:
        np.testing.assert_array_equal(w[:nfixed], weights[:nfixed])
        assert w[nfixed:].sum() == pytest.approx(weights[nfixed:].sum())
    drawn_a, drawn_b = (halves[0][nfixed:] > 0), (halves[1][nfixed:] > 0)
    assert not np.any(drawn_a & drawn_b) and np.all(drawn_a | drawn_b)
    cut = nfixed + int(np.argmax(drawn_b))
    assert not np.array_equal(masks[cut], ~masks[cut - 1])  # a coalition and its complement stay together


def test_partition_has_no_stability():
    model = tiny_model()
    settings = partition.Settings(mask="blur(4,4)", max_evals=40, batch_size=10)
    result = partition.Explainer(context(model, torch.zeros(0, 3, 16, 16), settings)).explain(
        torch.randn(1, 3, 16, 16), 1, [0])
    assert result.stability is None


def test_demo_model_stability_rises_with_nsamples_and_matches_reruns():
    """The demo's EfficientNet-Lite0 at the input, two photos: 4 vs 32 samples, three seeds each."""
    from explain_cli import pipeline
    from explain_cli.config import load_config
    from explain_cli.images import load_preprocessed

    cfg = load_config(REPO / "configs" / "demo.yaml", ["model.layer=input", "device=cpu"])
    prep = pipeline.prepare(cfg, pipeline.RunOptions())
    background = pipeline.load_background(prep)
    x = torch.from_numpy(np.stack([load_preprocessed(prep.input_dir / name, cfg.preprocess)[1]
                                   for name in ("chelsea.jpg", "coffee.jpg")]))
    found = {}
    for n in (4, 32):
        cfg.explainer_settings.nsamples = n
        explainer = pipeline.make_explainer(prep, background)
        runs = [explainer.explain(x, 1, [seed, seed + 100]) for seed in range(3)]
        # NaN: both samples of a half drew the image itself as reference (the demo's background is
        # the three photos), so that half-map is all zero; the CSV cell is blank then
        stability = np.array([r.stability[:, 0] for r in runs])  # (seed, image)
        rerun = np.array([rerun_correlation([r.values[i, 0] for r in runs]) for i in range(2)])
        found[n] = (stability, rerun)
    low, high = found[4][0], found[32][0]
    assert np.nanmean(high) > np.nanmean(low) + 0.2, (np.nanmean(low), np.nanmean(high))
    stability, rerun = found[32]
    assert np.all(np.isfinite(stability))
    se = np.hypot(stability.std(ddof=1) / np.sqrt(stability.size), rerun.std(ddof=1) / np.sqrt(rerun.size))
    assert abs(stability.mean() - rerun.mean()) < 3 * se, (stability.mean(), rerun.mean(), se)
