"""``precision``: each explainer under autocast agrees with float32 on the demo model.

Same images, background, settings and seeds in both arms; only the model's dtype differs. For
every image and every class both arms ranked in the top 2, the Pearson r of the attributions (the
whole (C, H, W) array) is printed and asserted; for deep the additivity error is printed and held
to the bound docs/config-reference.md documents. The CPU runs bfloat16 (float16 is refused there); the CUDA variants
run both and skip only without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from explain_cli.config import load_config
from explain_cli.errors import ConfigError
from explain_cli.explainers import _precision, get
from explain_cli.explainers.base import ExplainContext
from explain_cli.images import load_preprocessed
from explain_cli.models import build_model, resolve_layer, to_channels_last

REPO = Path(__file__).resolve().parents[1]
IMAGES = ["chelsea.jpg", "coffee.jpg"]
BACKGROUND = ["astronaut-02.jpg", "more/rocket.jpg"]

# (explainer, settings, layer, images used): the demo's gradient settings, small budgets for the
# rest, so both arms take seconds.
JOBS = {
    "gradient": ("gradient", {"nsamples": 32}, "blocks.3", 1),
    "deep": ("deep", {}, "input", 2),
    "partition": ("partition", {"mask": "blur(64,64)", "max_evals": 100}, "input", 1),
    "kernel": ("kernel", {"nsamples": 100, "segments": {"n_segments": 20}}, "input", 1),
}
# The issue asks r >= 0.99; in bfloat16 on this model only kernel reaches it at every setting
# measured (docs/config-reference.md, "Batch size and precision"): bfloat16 keeps 8 mantissa bits. Gradient's
# rounding noise averages out over samples (blocks.3: r 0.975-0.985 at 16 samples, 0.990-0.992
# at 200; at the input 0.93-0.95 at 200); partition's expansion order follows the outputs, so
# 16-bit noise also changes which cells get split (r 0.96-0.97 at 500 evaluations). The floors
# below are what this test's settings reach with a margin; float16 (CUDA) keeps 3 more bits.
MIN_R = {"gradient": 0.97, "partition": 0.95, "kernel": 0.99}
# Deep's additivity error, as a fraction of S = max(|f(x) - E f(r)|, mean_r |f(x) - f(r)|) (docs/explainers.md).
DEEP_BOUND = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-3}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ARMS = [pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
        pytest.param("cuda", torch.bfloat16, id="cuda-bfloat16", marks=CUDA),
        pytest.param("cuda", torch.float16, id="cuda-float16", marks=CUDA)]
PRECISION = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@pytest.fixture(scope="module")
def demo():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    model = to_channels_last(build_model(cfg.model, cfg.resolve).eval())

    def load(names):
        return torch.stack([torch.from_numpy(load_preprocessed(REPO / "sample_images" / n, cfg.preprocess)[1])
                            for n in names])

    return cfg, model, load(IMAGES), load(BACKGROUND)


def explain(demo, job: str, device: str, precision: str):
    cfg, model, images, background = demo
    name, settings, layer_name, n_images = JOBS[job]
    module = get(name)
    model = model.to(device)
    context = ExplainContext(model=model, layer=resolve_layer(model, layer_name), layer_name=layer_name,
                             background=background.to(device), mean=tuple(cfg.preprocess.mean),
                             std=tuple(cfg.preprocess.std), device=torch.device(device), batch_size=64,
                             settings=module.Settings(name=name, **settings), precision=precision)
    return module.Explainer(context).explain(images[:n_images].to(device), 2, [7, 8][:n_images])


def agreement(low, ref) -> list[tuple[int, int, float]]:
    """(image, class, r) for each class in both arms' top-k; the top-1 class must be the same."""
    out = []
    for i in range(ref.classes.shape[0]):
        assert low.classes[i, 0] == ref.classes[i, 0], (i, low.classes[i], ref.classes[i])
        for rank, c in enumerate(ref.classes[i]):
            hit = np.flatnonzero(low.classes[i] == c)
            if len(hit):
                r = np.corrcoef(low.values[i, hit[0]].ravel(), ref.values[i, rank].ravel())[0, 1]
                out.append((i, int(c), float(r)))
    return out


@pytest.mark.parametrize("device, dtype", ARMS)
@pytest.mark.parametrize("job", ["gradient", "partition", "kernel"])
def test_agrees_with_float32(demo, job, device, dtype):
    ref = explain(demo, job, device, "float32")
    low = explain(demo, job, device, PRECISION[dtype])
    for result in (ref, low):
        assert result.values.dtype == np.float32 and np.isfinite(result.values).all()
    rs = agreement(low, ref)
    print(f"\n{job} {device} {PRECISION[dtype]} vs float32: " + ", ".join(
        f"{IMAGES[i]}/{c}: r={r:.4f}" for i, c, r in rs))
    print(f"  outputs differ by up to {np.abs(low.outputs - ref.outputs).max():.3f} (logits)")
    assert len(rs) >= ref.classes.shape[0]
    for i, c, r in rs:
        assert r >= MIN_R[job], (IMAGES[i], c, r)


@pytest.mark.parametrize("device, dtype", ARMS)
def test_deep_additivity_under_autocast(demo, device, dtype):
    cfg, model, images, background = demo
    ref = explain(demo, "deep", device, "float32")
    low = explain(demo, "deep", device, PRECISION[dtype])
    with torch.no_grad():
        f_refs = model.to(device)(background.to(device)).float().cpu().numpy()  # (B, classes)
    worst = {}
    for name, result, dt in (("float32", ref, torch.float32), (PRECISION[dtype], low, dtype)):
        f_r = f_refs[:, result.classes]  # (B, N, k)
        scale = np.maximum(np.abs(result.outputs - result.base_values),
                           np.abs(result.outputs[None] - f_r).mean(0))
        relative = result.additivity_error / scale
        assert np.isfinite(relative).all()
        worst[name] = float(relative.max())
        assert worst[name] <= DEEP_BOUND[dt], (name, worst[name])
    rs = agreement(low, ref)
    print(f"\ndeep {device} {PRECISION[dtype]}: additivity error / S up to {worst[PRECISION[dtype]]:.2e} "
          f"(float32: {worst['float32']:.2e}); r vs float32: " + ", ".join(f"{r:.4f}" for _, _, r in rs))
    assert all(r > 0.8 for _, _, r in rs)  # same picture, coarser: the documented trade-off


def test_outputs_stay_float32_and_float16_is_refused_on_cpu(demo):
    cfg, model, images, _ = demo
    wrapped = _precision.with_precision(model, "bfloat16", torch.device("cpu"))
    assert isinstance(wrapped, _precision.Autocast) and _precision.unwrap(wrapped) is model
    assert _precision.with_precision(wrapped, "float32", torch.device("cpu")) is model
    with torch.no_grad():
        out = wrapped(images[:1])
        inner = {}

        def hook(module, args, output):
            inner["dtype"] = output.dtype

        handle = model.conv_head.register_forward_hook(hook)
        try:
            wrapped(images[:1])
        finally:
            handle.remove()
    assert out.dtype == torch.float32 and inner["dtype"] == torch.bfloat16
    # code that inspects the model (token grids, layer names) sees the user's model through the wrapper
    assert wrapped.get_submodule("blocks.3") is model.blocks[3] and wrapped.get_submodule("") is wrapped
    assert wrapped.num_features == model.num_features and wrapped.conv_stem is model.conv_stem
    with pytest.raises(ConfigError) as info:
        _precision.with_precision(model, "float16", torch.device("cpu"))
    assert info.value.key == "precision" and "bfloat16" in str(info.value)


def test_precision_key_in_config_and_run(tiny_project):
    import json

    from typer.testing import CliRunner

    from explain_cli.cli import app

    cfg = tiny_project / "config.yaml"
    assert load_config(cfg).precision == "float32"  # the default
    with pytest.raises(ConfigError) as info:
        load_config(cfg, ["precision=bf16"])
    assert info.value.key == "precision" and "bfloat16" in str(info.value)

    runner = CliRunner()
    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--set", "precision=bfloat16"])
    assert result.exit_code == 0, result.output
    info = json.loads((tiny_project / "out" / "run.json").read_text())
    assert info["config"]["precision"] == "bfloat16"
    rows = (tiny_project / "out" / "topk.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 * 2  # 4 images, top-2

    result = runner.invoke(app, ["run", str(cfg), "--no-progress", "--overwrite", "--set", "precision=float16"])
    assert result.exit_code == 2
    assert "precision" in result.output and "bfloat16" in result.output


@pytest.mark.parametrize("name", ["gradient", "deep"])
def test_float16_gradients_are_scaled_against_underflow(monkeypatch, name):
    """Gradients of small outputs underflow float16 (below 6e-8); the scaled ones keep their digits.

    float16 runs on the CPU here only for this test (the config refuses it there: slow kernels).
    """
    from torch import nn

    monkeypatch.setattr(_precision, "check", lambda precision, device: _precision.DTYPES[precision])
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[-1].weight.mul_(1e-3)  # outputs (and so all gradients) 1000x smaller
    g = torch.Generator().manual_seed(0)
    background, images = torch.randn(4, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    module = get(name)
    settings = module.Settings(name=name, **({"nsamples": 32} if name == "gradient" else {}))

    def run(precision):
        ctx = ExplainContext(model=net, layer=None, layer_name="input", background=background, mean=(0, 0, 0),
                             std=(1, 1, 1), device=torch.device("cpu"), batch_size=64, settings=settings,
                             precision=precision)
        return module.Explainer(ctx).explain(images, 2, [1, 2])

    def worst_r(low, ref):
        return min(np.corrcoef(low.values[i, r].ravel(), ref.values[i, r].ravel())[0, 1]
                   for i in range(2) for r in range(2))

    ref = run("float32")
    assert np.abs(ref.values).max() < 1e-3
    scaled = run("float16")
    monkeypatch.setattr(_precision, "_GRAD_SCALE", {})
    unscaled = run("float16")
    r_scaled, r_unscaled = worst_r(scaled, ref), worst_r(unscaled, ref)
    print(f"\n{name} float16 on tiny outputs: r = {r_scaled:.5f} scaled, {r_unscaled:.5f} unscaled")
    assert r_scaled >= 0.999 and r_scaled > r_unscaled
    np.testing.assert_array_equal(scaled.classes, ref.classes)


@pytest.mark.parametrize("name", ["gradient", "deep"])
def test_token_layer_under_autocast(name):
    """A ViT block's input under bfloat16: the wrapper lets the token grid be found on the user's model."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=5).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():
        model.head.weight.normal_(0, 1.0)
    g = torch.Generator().manual_seed(1)
    background, images = torch.randn(4, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    module = get(name)
    settings = module.Settings(name=name, **({"nsamples": 16} if name == "gradient" else {}))

    def run(precision):
        ctx = ExplainContext(model=model, layer=model.blocks[1], layer_name="blocks.1", background=background,
                             mean=(0.5,) * 3, std=(0.5,) * 3, device=torch.device("cpu"), batch_size=64,
                             settings=settings, precision=precision)
        return module.Explainer(ctx).explain(images, 2, [1, 2])

    ref, low = run("float32"), run("bfloat16")
    assert low.values.shape == ref.values.shape == (2, 2, 32, 4, 4)  # 16 patch tokens on the 4x4 grid
    assert low.values.dtype == np.float32 and np.isfinite(low.values).all()
    rs = agreement(low, ref)
    print(f"\n{name} at a ViT token layer, bfloat16 vs float32: r = " + ", ".join(f"{r:.4f}" for _, _, r in rs))
    assert min(r for _, _, r in rs) > 0.9
