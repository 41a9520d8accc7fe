"""Faithfulness (deletion/insertion AUC): separates true from random maps, matches a per-image loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explain_cli import masking, metrics

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
SIZE = 16


def linear_model(seed: int = 0) -> nn.Module:
    """Three classes, each a linear function of the pixels of one quadrant only (known evidence)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(3, 3, SIZE, SIZE)
    h = SIZE // 2
    weight[0, :, :h, :h] = torch.rand(3, h, h, generator=gen)
    weight[1, :, h:, h:] = torch.rand(3, h, h, generator=gen)
    weight[2, :, :h, h:] = torch.rand(3, h, h, generator=gen) * 0.5
    lin = nn.Linear(3 * SIZE * SIZE, 3)
    with torch.no_grad():
        lin.weight.copy_(weight.reshape(3, -1) * 0.2)
        lin.bias.zero_()
    return nn.Sequential(nn.Flatten(), lin).eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3, SIZE, SIZE)).astype(np.float32) / 255
    return torch.from_numpy((pixels - 0.5) / 0.25)


def grey_baseline(level: float) -> torch.Tensor:
    return torch.full((3, SIZE, SIZE), (level / 255 - 0.5) / 0.25)


def true_maps(model: nn.Module, x: torch.Tensor, classes: np.ndarray, base: torch.Tensor) -> np.ndarray:
    """Exact SHAP values of a linear model against the baseline: w_c * (x - b)."""
    weight = model[1].weight.detach().reshape(3, 3, SIZE, SIZE)
    out = np.empty((x.shape[0], classes.shape[1], 3, SIZE, SIZE), np.float32)
    for i in range(x.shape[0]):
        for r, c in enumerate(classes[i]):
            out[i, r] = (weight[c] * (x[i] - base)).numpy()
    return out


def top_classes(model: nn.Module, x: torch.Tensor, k: int) -> np.ndarray:
    with torch.no_grad():
        return torch.argsort(model(x), dim=1, descending=True)[:, :k].numpy()


def reference(model, x, values, classes, seeds, steps, base, segments=None):
    """A plain loop: one image, one order, one step, one model call at a time."""
    n, _, height, width = x.shape
    hw = height * width
    out = {"deletion": np.zeros(classes.shape), "insertion": np.zeros(classes.shape),
           "random_deletion": np.zeros(classes.shape), "random_insertion": np.zeros(classes.shape)}

    def prob(img, c):
        with torch.no_grad():
            return torch.softmax(model(img[None]), 1)[0, c].item()

    def curve(i, order, c, deleting):
        ys = []
        for t in range(steps + 1):
            count = int(round(t * hw / steps))
            chosen = np.zeros(hw, bool)
            chosen[order[:count]] = True
            chosen = torch.from_numpy(chosen.reshape(height, width))
            img = torch.where(chosen, base[i], x[i]) if deleting else torch.where(chosen, x[i], base[i])
            ys.append(prob(img, c))
        return np.trapezoid(ys, dx=1.0 / steps)

    for i in range(n):
        random_order = np.argsort(metrics.random_ranks(seeds[i], hw))
        for r, c in enumerate(classes[i]):
            score = values[i, r].sum(0)
            if score.shape != (height, width):
                fy, fx = height // score.shape[0], width // score.shape[1]
                score = np.repeat(np.repeat(score, fy, 0), fx, 1)
            score = score.reshape(-1).astype(np.float64)
            if segments is None:
                order = np.argsort(-score, kind="stable")
            else:
                labels = segments[i].reshape(-1)
                seg_values = sorted({(-score[labels == s].mean(), s) for s in np.unique(labels)})
                order = np.concatenate([np.flatnonzero(labels == s) for _, s in seg_values])
            out["deletion"][i, r] = curve(i, order, c, True)
            out["insertion"][i, r] = curve(i, order, c, False)
            out["random_deletion"][i, r] = curve(i, random_order, c, True)
            out["random_insertion"][i, r] = curve(i, random_order, c, False)
    return out


def run(model, x, values, classes, seeds, steps, baseline, batch_size=7, segments=None, which=metrics.METRICS):
    return metrics.faithfulness(model, x, values, classes, seeds, which, steps, baseline, MEAN, STD,
                                batch_size, segments=segments)


def test_true_attribution_beats_random_and_the_reference_below():
    model = linear_model()
    x = images(4)
    classes = top_classes(model, x, 2)
    base = grey_baseline(128)
    values = true_maps(model, x, classes, base)
    seeds = [11, 12, 13, 14]
    result = run(model, x, values, classes, seeds, 10, [128.0, 128.0, 128.0])
    noise = np.random.default_rng(5).normal(size=values.shape).astype(np.float32)
    shuffled = run(model, x, noise, classes, seeds, 10, [128.0, 128.0, 128.0])

    # a random map and a random order are alike; the true map is better on both metrics, everywhere
    assert np.all(result.deletion < shuffled.deletion) and np.all(result.insertion > shuffled.insertion)
    assert np.all(result.deletion < result.random_deletion)
    assert np.all(result.insertion > result.random_insertion)
    assert result.deletion.mean() < result.random_deletion.mean() - 0.05
    assert result.insertion.mean() > result.random_insertion.mean() + 0.05
    # a map that puts the evidence last is worse than random
    worst = run(model, x, -values, classes, seeds, 10, [128.0, 128.0, 128.0])
    assert np.all(worst.deletion > result.random_deletion) and np.all(worst.insertion < result.random_insertion)

    ref = reference(model, x, values, classes, seeds, 10, base[None].expand_as(x))
    for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
        np.testing.assert_allclose(getattr(result, name), ref[name], atol=1e-6, err_msg=name)
    assert result.evaluations == 4 * (2 + 2 * 3 * 9)


def test_blur_baseline_layer_map_and_batching_match_the_reference():
    model = linear_model(3)
    x = images(3, seed=4)
    classes = top_classes(model, x, 3)
    blurred = masking.fill_images(x, "blur(5,3)", MEAN, STD)
    # an 8x8 "layer" map, upsampled by 2 to rank the 16x16 pixels
    values = np.random.default_rng(2).normal(size=(3, 3, 5, 8, 8)).astype(np.float32)
    seeds = [1, 2, 3]
    result = run(model, x, values, classes, seeds, 7, "blur(5,3)", batch_size=5)
    ref = reference(model, x, values, classes, seeds, 7, blurred)
    for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
        np.testing.assert_allclose(getattr(result, name), ref[name], atol=1e-6, err_msg=name)
    # one big batch and images one at a time give the same numbers
    whole = run(model, x, values, classes, seeds, 7, "blur(5,3)", batch_size=1000)
    np.testing.assert_allclose(whole.deletion, result.deletion, atol=1e-6)
    alone = run(model, x[1:2], values[1:2], classes[1:2], seeds[1:2], 7, "blur(5,3)")
    np.testing.assert_allclose(alone.insertion[0], result.insertion[1], atol=1e-6)
    np.testing.assert_allclose(alone.random_deletion[0], result.random_deletion[1], atol=1e-6)


def test_baseline_blur_is_a_box_blur_in_pixel_space():
    import cv2

    x = images(1, seed=9)
    got = masking.fill_images(x, "blur(5,3)", MEAN, STD)[0].numpy()
    pixels = np.moveaxis(x[0].numpy() * 0.25 + 0.5, 0, -1)
    want = (np.moveaxis(cv2.blur(pixels, (5, 3)), -1, 0) - 0.5) / 0.25
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_superpixel_maps_rank_superpixels():
    model = linear_model(1)
    x = images(2, seed=6)
    classes = top_classes(model, x, 2)
    rng = np.random.default_rng(0)
    # 16 square superpixels of 4x4 with shuffled labels; the map paints one value per superpixel / C
    blocks = rng.permutation(16).reshape(4, 4)
    segments = np.stack([np.repeat(np.repeat(blocks, 4, 0), 4, 1)] * 2)
    phi = rng.normal(size=(2, 2, 16))
    values = np.stack([np.stack([np.broadcast_to(phi[i, r][segments[i]] / 3, (3, SIZE, SIZE))
                                 for r in range(2)]) for i in range(2)]).astype(np.float32)
    result = run(model, x, values, classes, [4, 5], 8, [0.0, 0.0, 0.0], segments=segments)
    ref = reference(model, x, values, classes, [4, 5], 8, grey_baseline(0)[None].expand_as(x), segments)
    for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
        np.testing.assert_allclose(getattr(result, name), ref[name], atol=1e-6, err_msg=name)
    ranks = metrics.pixel_ranks(values[0, 0].sum(0), segments[0])
    first = np.argsort(ranks)[:16]
    assert len(set(segments[0].reshape(-1)[first])) == 1  # the best superpixel's pixels come first, together
    assert segments[0].reshape(-1)[first[0]] == int(np.argmax(phi[0, 0]))


def test_one_metric_only_and_costs():
    model = linear_model()
    x = images(2)
    classes = top_classes(model, x, 2)
    values = true_maps(model, x, classes, grey_baseline(128))
    result = run(model, x, values, classes, [1, 2], 5, "blur(3,3)", which=["insertion"])
    assert result.deletion is None and result.random_deletion is None
    assert result.insertion.shape == (2, 2) and result.evaluations == 2 * (2 + 3 * 4)
    assert metrics.faithfulness(model, x, values, classes, [1, 2], [], 5, "blur(3,3)", MEAN, STD, 8).evaluations == 0


def test_auc_is_the_trapezoid():
    assert metrics.auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert metrics.auc(np.array([0.0, 1.0])) == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.auc(np.array([0.2, 0.9, 0.4, 0.1])), np.trapezoid([0.2, 0.9, 0.4, 0.1], dx=1 / 3))


@pytest.mark.parametrize("value, expected", [
    ("blur(32, 32)", "blur(32,32)"), (128, [128.0] * 3), ([1, 2, 3], [1.0, 2.0, 3.0])])
def test_parse_baseline(value, expected):
    assert masking.parse_baseline(value) == expected


@pytest.mark.parametrize("value", ["inpaint_telea", "blur(0,3)", 300, "mean", [1, 2]])
def test_parse_baseline_refuses(value):
    with pytest.raises(ValueError):
        masking.parse_baseline(value)


@pytest.mark.parametrize("settings", [
    {"name": "gradient", "nsamples": 8},
    {"name": "partition", "mask": "blur(4,4)", "max_evals": 40, "batch_size": 10},
    {"name": "kernel", "nsamples": 40, "segments": {"n_segments": 8, "compactness": 10, "sigma": 1}},
])
def test_run_writes_metric_columns_and_run_json(tiny_project, settings):
    import csv
    import json

    import yaml
    from typer.testing import CliRunner

    from explain_cli.cli import app

    config = yaml.safe_load((tiny_project / "config.yaml").read_text())
    config.update(explainer=settings, metrics=["insertion", "deletion"], metrics_steps=4)
    path = tiny_project / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    with open(tiny_project / "out" / "topk.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"stability", "deletion_auc", "insertion_auc", "nsamples_used"} <= set(rows[0]) and len(rows) == 8
    for row in rows:
        assert 0 <= float(row["deletion_auc"]) <= 1 and 0 <= float(row["insertion_auc"]) <= 1
        if settings["name"] == "partition":
            assert row["stability"] == "" and row["nsamples_used"] == ""  # deterministic: no split half, no count
        elif settings["name"] == "gradient":
            assert int(row["nsamples_used"]) == settings["nsamples"]
        else:  # kernel: at most 2**M - 2 coalitions
            assert 0 < int(row["nsamples_used"]) <= settings["nsamples"]
        if settings["name"] != "partition":
            assert -1 <= float(row["stability"]) <= 1
    info = json.loads((tiny_project / "out" / "run.json").read_text())["metrics"]
    assert info["computed"] == ["deletion", "insertion"] and info["steps"] == 4
    assert info["model_evaluations"] == 4 * (2 + 2 * 3 * 3) and info["rows"] == 8
    mean_deletion = np.mean([float(r["deletion_auc"]) for r in rows])
    assert info["mean"]["deletion_auc"] == pytest.approx(mean_deletion, abs=1e-5)
    assert 0 <= info["random_reference"]["deletion_auc"] <= 1 and 0 <= info["random_reference"]["insertion_auc"] <= 1
    if settings["name"] == "partition":
        assert info["stability_median"] is None
    else:
        stabilities = [float(r["stability"]) for r in rows]
        assert info["stability_median"] == pytest.approx(np.median(stabilities), abs=1e-5)


def test_metrics_config_keys(tiny_project):
    from explain_cli.config import load_config
    from explain_cli.errors import ConfigError

    cfg = load_config(tiny_project / "config.yaml")
    assert cfg.metrics == [] and cfg.metrics_steps == 20 and cfg.metrics_baseline == "blur(32,32)"
    for key, value, message in (("metrics", "[deletoin]", "deletion"), ("metrics_steps", "1", ">= 2"),
                                ("metrics_baseline", "inpaint_ns", "inpainting")):
        with pytest.raises(ConfigError) as info:
            load_config(tiny_project / "config.yaml", [f"{key}={value}"])
        assert info.value.key.startswith(key) and message in str(info.value)


def test_merge_summaries_weights_shards_by_rows():
    a = {"computed": ["deletion"], "steps": 20, "baseline": "blur(32,32)", "model_evaluations": 10, "rows": 2,
         "mean": {"deletion_auc": 0.2, "insertion_auc": None},
         "random_reference": {"deletion_auc": 0.4, "insertion_auc": None}}
    b = dict(a, model_evaluations=30, rows=6, mean={"deletion_auc": 0.1, "insertion_auc": None},
             random_reference={"deletion_auc": 0.5, "insertion_auc": None})
    merged = metrics.merge_summaries([a, None, b], [0.2, float("nan"), 0.9, 0.4])
    assert merged["model_evaluations"] == 40 and merged["rows"] == 8
    assert merged["mean"]["deletion_auc"] == pytest.approx((0.2 * 2 + 0.1 * 6) / 8)
    assert merged["random_reference"]["deletion_auc"] == pytest.approx((0.4 * 2 + 0.5 * 6) / 8)
    assert merged["random_reference"]["insertion_auc"] is None
    assert merged["stability_median"] == pytest.approx(0.4) and merged["stability_rows"] == 3
    assert metrics.merge_summaries([None, None], []) is None


@pytest.mark.parametrize("threshold, warns", [(1.01, True), (-2.0, False)])
def test_run_warns_when_median_stability_is_low(tiny_project, caplog, monkeypatch, threshold, warns):
    import logging

    from explain_cli import pipeline
    from explain_cli.config import load_config

    monkeypatch.setattr(pipeline, "UNSTABLE", threshold)  # every stability is <= 1 and >= -1
    cfg = load_config(tiny_project / "config.yaml", ["explainer.nsamples=4"])
    with caplog.at_level(logging.WARNING, logger="explain_cli"):
        summary = pipeline.run(cfg, pipeline.RunOptions(progress=False))
    assert summary.explained == 4
    assert any("median stability" in r.getMessage() for r in caplog.records) == warns
