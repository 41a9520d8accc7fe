"""Token layers (the input of a ViT / Mixer / LeViT block): gradient and deep attribute per token and
channel and map the patch tokens onto the patch grid as (k, C, h, w), dropping the prefix tokens.
Also: layers whose input is not a single tensor are refused at validate."""

from __future__ import annotations

import json
import logging
import textwrap

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from torch import nn
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.errors import ConfigError
from explain_cli.explainers import _utils, deep, gradient
from explain_cli.explainers.base import ExplainContext
from explain_cli.models import check_layer_input
from test_deep import BOUND_FLOAT32, relative_additivity

SIZE = 32


def small_vit(**kwargs) -> nn.Module:
    """timm ViT, 32 px, 8 px patches (4x4 grid), depth 2, width 32; explicit attention (the deep
    rules cover matmul + softmax; scaled_dot_product_attention gets its own rule elsewhere)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=SIZE, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=5, **kwargs).eval()
    for block in model.blocks:
        block.attn.fused_attn = False
    with torch.no_grad():  # timm's head init is tiny: outputs would hardly differ between images
        model.head.weight.normal_(0, 1.0)
    return model


def small_tv_vit() -> nn.Module:
    """torchvision's VisionTransformer in the vit_b_16 layout, small; its head is zero-initialised."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                              mlp_dim=64, num_classes=5).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 1.0)
        model.heads.head.bias.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    background = torch.randn(4, 3, SIZE, SIZE, generator=g)
    images = torch.randn(2, 3, SIZE, SIZE, generator=g) * 1.5
    return background, images


def make(module, model, layer_name, background, batch_size=64, **settings):
    context = ExplainContext(
        model=model, layer=model.get_submodule(layer_name), layer_name=layer_name, background=background,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device=torch.device("cpu"), batch_size=batch_size,
        settings=module.Settings(**settings))
    return module.Explainer(context)


def layer_input(model, layer_name, x) -> torch.Tensor:
    captured = {}

    def hook(module, args):
        captured["h"] = args[0]

    handle = model.get_submodule(layer_name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return captured["h"]


def on_grid(tokens: np.ndarray, prefix: int, h: int, w: int) -> np.ndarray:
    """(..., T, C) -> (..., C, h, w) written out cell by cell: the reference for the mapping."""
    out = np.zeros(tokens.shape[:-2] + (tokens.shape[-1], h, w), dtype=tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[..., :, i, j] = tokens[..., prefix + i * w + j, :]
    return out


CASES = [  # (model factory, layer, prefix tokens)
    (small_vit, "blocks.0", 1),
    (small_vit, "blocks.1", 1),
    (small_tv_vit, "encoder.layers.encoder_layer_1", 1),
]


@pytest.mark.parametrize("factory,layer_name,prefix", CASES)
def test_gradient_at_a_token_layer_is_the_direct_computation(data, factory, layer_name, prefix):
    """With the image as its own background every sample is the image itself, so the expected gradient
    is exactly dF/dh(x) * h(x): computed here by hand, token by token, and put on the grid by hand."""
    model = factory()
    _, images = data
    x = images[:1]
    result = make(gradient, model, layer_name, x.clone(), nsamples=3, path="input").explain(x, 2, [7])
    assert result.values.shape == (1, 2, 32, 4, 4) and result.values.dtype == np.float32

    h = layer_input(model, layer_name, x).detach().requires_grad_(True)
    layer = model.get_submodule(layer_name)
    handle = layer.register_forward_pre_hook(lambda module, args: (h,) + tuple(args[1:]))
    try:
        out = model(x)
    finally:
        handle.remove()
    for r, c in enumerate(result.classes[0]):
        (grad,) = torch.autograd.grad(out[0, c], h, retain_graph=True)
        tokens = (grad * h).detach().numpy()[0]  # (T, C)
        np.testing.assert_allclose(result.values[0, r], on_grid(tokens, prefix, 4, 4), rtol=1e-4, atol=1e-6)
        assert result.shap_sum[0, r] == pytest.approx(tokens.sum(), rel=1e-4, abs=1e-6)  # prefix included
    assert np.abs(result.values).max() > 1e-3  # not vacuous


@pytest.mark.parametrize("layer_name", ["blocks.0", "blocks.1"])
def test_gradient_at_a_token_layer_agrees_with_shap(data, layer_name):
    """shap's GradientExplainer((model, layer)) works on any layer-input shape and returns the tokens
    (N, T, C, k); put on the grid they equal ours. The image is its own background, so both estimates
    are exact (every sample is the image) and a handful of samples compares them to float precision
    (shap runs one batch-1 forward per sample; the Monte-Carlo agreement at a layer is tested on a
    conv layer in test_gradient.py, and the sampling does not depend on the layer input's shape)."""
    import shap
    model = small_vit()
    _, images = data
    x = images[1:2]
    ours = make(gradient, model, layer_name, x.clone(), nsamples=4, path="input").explain(x, 2, [3])

    reference = shap.GradientExplainer((model, model.get_submodule(layer_name)), x.clone())
    values, indexes = reference.shap_values(x, ranked_outputs=2, nsamples=4, rseed=3)
    values = np.moveaxis(np.asarray(values), -1, 1)  # (N, k, T, C)
    assert values.shape == (1, 2, 17, 32)
    np.testing.assert_array_equal(ours.classes, indexes.numpy())
    theirs = on_grid(values, 1, 4, 4)
    assert ours.values.shape == theirs.shape == (1, 2, 32, 4, 4)
    np.testing.assert_allclose(ours.values, theirs, rtol=1e-4, atol=1e-6 * np.abs(theirs).max())
    np.testing.assert_allclose(ours.shap_sum, values.reshape(1, 2, -1).sum(-1), rtol=1e-4, atol=1e-6)
    assert np.abs(theirs).max() > 1e-3


def test_gradient_channel_sums_vanish_behind_layer_norm(data):
    """Why the docs warn about the last block: there the patch tokens reach the class-token output only
    through the block's pre-norm, which is scale-invariant, so sum_c dF/dh * h = 0 per patch token
    (the overlay is blank) while the per-channel values are not zero. At blocks.0 it is not so."""
    model = small_vit()
    background, images = data
    last = make(gradient, model, "blocks.1", background, nsamples=16, path="input").explain(images, 1, [1, 2])
    first = make(gradient, model, "blocks.0", background, nsamples=16, path="input").explain(images, 1, [1, 2])
    scale = np.abs(last.values).max()
    assert np.abs(last.values.sum(axis=2)).max() <= 1e-4 * scale
    assert np.abs(first.values.sum(axis=2)).max() > 1e-2 * np.abs(first.values).max()


@pytest.mark.parametrize("layer_name", ["blocks.0", "blocks.1"])
def test_deep_at_a_token_layer_adds_up(data, layer_name):
    model = small_vit()
    background, images = data
    result = make(deep, model, layer_name, background).explain(images, 2, [1, 2])
    assert result.values.shape == (2, 2, 32, 4, 4)
    assert relative_additivity(model, background, images, result).max() <= BOUND_FLOAT32

    # the map is the patch tokens' (multiplier * (h(x) - h(r))) put on the grid: check via the
    # class token's share, which is the difference between the sum and the map's sum
    prefix_share = result.shap_sum - result.values.sum(axis=(2, 3, 4))
    if layer_name == "blocks.0":  # the class token is cls_token + pos_embed for every image: no share
        np.testing.assert_allclose(prefix_share, 0, atol=1e-5)
    else:  # after a block the class token depends on the image and carries part of the sum
        assert np.abs(prefix_share).max() > 1e-3


def test_deep_everything_in_the_class_token_at_the_final_norm(data):
    """torchvision's ViT reads only the class token after encoder.ln: the patch tokens get exactly
    nothing, the whole (exact) sum is the dropped prefix token's; the docs say so."""
    model = small_tv_vit()
    background, images = data
    result = make(deep, model, "encoder.ln", background).explain(images, 2, [1, 2])
    assert result.values.shape == (2, 2, 32, 4, 4)
    assert relative_additivity(model, background, images, result).max() <= BOUND_FLOAT32
    assert np.abs(result.values).max() == 0.0
    assert np.abs(result.shap_sum).min() > 1e-3


def test_deep_at_a_torchvision_encoder_layer_adds_up(data):
    model = small_tv_vit()
    background, images = data
    result = make(deep, model, "encoder.layers.encoder_layer_1", background).explain(images, 2, [1, 2])
    assert result.values.shape == (2, 2, 32, 4, 4)
    assert relative_additivity(model, background, images, result).max() <= BOUND_FLOAT32


# ----------------------------------------------------------------------------------------------
# the mapping, checked at validate


def mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=SIZE, patch_size=8, num_blocks=2, embed_dim=32, num_classes=5).eval()


@pytest.mark.parametrize("factory,layer_name,size,prefix,grid,assumed", [
    (small_vit, "blocks.1", SIZE, 1, [4, 4], False),
    (lambda: small_vit(reg_tokens=4), "blocks.0", SIZE, 5, [4, 4], False),
    (lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=SIZE,
                               patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=5),
     "blocks.0", SIZE, 2, [4, 4], False),
    (small_tv_vit, "encoder.layers.encoder_layer_0", SIZE, 1, [4, 4], False),
    (mixer, "blocks.1", SIZE, 0, [4, 4], False),
    (lambda: timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=5), "stages.1", 64, 0, [4, 4], True),
    (lambda: timm.create_model("levit_128s", pretrained=False, img_size=64, num_classes=5), "stages.2", 64, 0, [2, 2], True),
    # the class token joins only in the late class-attention blocks: none at the early blocks (issue 21)
    (lambda: timm.create_model("cait_xxs24_224", pretrained=False, img_size=SIZE, patch_size=8, depth=2,
                               embed_dim=32, num_heads=2, depth_token_only=1, num_classes=5), "blocks.1", SIZE, 0,
     [4, 4], False),
    (lambda: timm.create_model("xcit_nano_12_p8_224", pretrained=False, img_size=SIZE, depth=2, embed_dim=32,
                               num_heads=2, cls_attn_layers=1, num_classes=5), "blocks.1", SIZE, 0, [4, 4], True),
])
def test_token_grid_of_each_family(factory, layer_name, size, prefix, grid, assumed, caplog):
    model = factory().eval()
    with caplog.at_level(logging.INFO, logger="explain_cli"):
        found = check_layer_input(model, model.get_submodule(layer_name), layer_name, size)
    assert found["prefix_tokens_dropped"] == prefix and found["grid"] == grid and found["assumed"] is assumed
    level = logging.WARNING if assumed else logging.INFO
    assert any(r.levelno == level and layer_name in r.message and "grid" in r.message for r in caplog.records)


def test_conv_map_and_input_need_no_mapping():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    assert check_layer_input(model, model[1], "1", 8) is None
    assert check_layer_input(model, None, "input", 8) is None


class Tokens(nn.Module):
    """Conv stem -> (N, T, C) tokens, optionally with extra tokens in front that the model does not
    declare (so nothing tells the mapping how many there are)."""

    def __init__(self, extra: int = 0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.extra = nn.Parameter(torch.randn(1, extra, 8)) if extra else None
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        if self.extra is not None:
            t = torch.cat([self.extra.expand(t.shape[0], -1, -1), t], 1)
        return self.head(self.block(t).mean(1))


def test_unmappable_or_wrong_rank_layers_are_refused():
    model = Tokens(extra=2).eval()  # 2 + 16 tokens, not a square, no declared prefix
    with pytest.raises(ConfigError) as info:
        check_layer_input(model, model.block, "block", 16)
    assert info.value.key == "model.layer" and "18 tokens" in info.value.message and "patch grid" in info.value.message
    with pytest.raises(ConfigError) as info:  # the head takes (N, C): not a map
        check_layer_input(model, model.head, "head", 16)
    assert "4-D" in info.value.message and "'head'" in info.value.message

    plain = Tokens().eval()  # 16 tokens, nothing declared: a 4x4 grid is assumed
    assert check_layer_input(plain, plain.block, "block", 16)["grid"] == [4, 4]
    # the explainers use the same mapping (here as their last step), and refuse what it refuses
    values = torch.arange(2 * 3 * 16 * 8, dtype=torch.float32).reshape(2, 3, 16, 8)
    np.testing.assert_array_equal(_utils.layer_map(values, plain, "block").numpy(), on_grid(values.numpy(), 0, 4, 4))
    with pytest.raises(ConfigError):
        _utils.layer_map(torch.zeros(1, 1, 18, 8), model, "block")


class ListStage(nn.Module):
    """An HRNet-like stage: takes a list of tensors (one per resolution) and returns a list."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)])

    def forward(self, xs):
        return [branch(x) for branch, x in zip(self.branches, xs)]


class TwoBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.stage = ListStage()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        a = self.stem(x)
        a, b = self.stage([a, self.down(a)])
        return self.head(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_list_input_layer_is_refused_naming_its_submodules():
    model = TwoBranch().eval()
    with pytest.raises(ConfigError) as info:
        check_layer_input(model, model.stage, "stage", 16)
    message = info.value.message
    assert info.value.key == "model.layer" and "'stage'" in message and "list of 2" in message
    assert "stage.branches.0" in message and "stage.branches.1" in message
    # the explainers alone (without validate) refuse it too, instead of dying per image
    g = torch.Generator().manual_seed(0)
    for module in (gradient, deep):
        explainer = make(module, model, "stage", torch.randn(2, 3, 16, 16, generator=g))
        with pytest.raises(ConfigError, match="list of 2"):
            explainer.explain(torch.randn(1, 3, 16, 16, generator=g), 1, [0])


# ----------------------------------------------------------------------------------------------
# end to end: validate and run


TINY_VIT = textwrap.dedent('''
    import timm
    import torch
    from torch import nn


    class ListStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList([nn.Identity(), nn.Identity()])

        def forward(self, xs):
            return [b(x) for b, x in zip(self.branches, xs)]


    class Wrapped(nn.Module):
        """A ViT behind a list-taking stage, to check both kinds of layer from a config."""

        def __init__(self, num_classes=3):
            super().__init__()
            torch.manual_seed(0)
            self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                                         depth=2, embed_dim=16, num_heads=2, num_classes=num_classes)
            for block in self.vit.blocks:
                block.attn.fused_attn = False
            self.stage = ListStage()

        def forward(self, x):
            a, b = self.stage([x, x])
            return self.vit((a + b) / 2)


    def make(num_classes=3):
        return Wrapped(num_classes)
''')


def test_validate_and_run_at_a_token_layer(tiny_project):
    (tiny_project / "tinyvit.py").write_text(TINY_VIT)
    config = yaml.safe_load((tiny_project / "config.yaml").read_text())
    config["model"].update({"arch": "python:tinyvit:make", "checkpoint": None, "layer": "stage"})
    config["explainer"] = {"name": "deep"}
    config["output"]["save_values"] = True
    path = tiny_project / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()

    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "model.layer" in result.output and "stage.branches.0" in result.output
    assert "Traceback" not in result.output

    result = runner.invoke(app, ["run", str(path), "--no-progress", "--set", "model.layer=vit.blocks.1"])
    assert result.exit_code == 0, result.output
    assert "4x4 patch grid" in result.output
    out = tiny_project / "out"
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["layer_tokens"]["prefix_tokens_dropped"] == 1 and run_info["layer_tokens"]["grid"] == [4, 4]
    with np.load(out / "values" / "three.bmp.npz") as npz:
        assert npz["values"].shape == (2, 16, 4, 4)
    rows = list(csv_rows(out / "topk.csv"))
    assert len(rows) == 8
    for row in rows:  # deep at a token layer: exact, the class token's share included in shap_sum
        assert float(row["additivity_error"]) <= 1e-3 * max(1.0, abs(float(row["output"]) - float(row["base_value"])))


def csv_rows(path):
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_layer_of_a_torchscript_model_is_refused():
    """Hooks do not fire inside TorchScript: refused at validate with that reason (it was an
    'unexpected RuntimeError' from get_submodule for a scripted model)."""
    from explain_cli.models import resolve_layer

    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    scripted = torch.jit.script(nn.Sequential(body, nn.Flatten(), nn.Linear(4 * 6 * 6, 2)))
    with pytest.raises(ConfigError, match="TorchScript"):
        resolve_layer(scripted, "0.1")
    assert resolve_layer(scripted, "input") is None
    mixed = nn.Sequential(torch.jit.script(body), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    layer = resolve_layer(mixed, "0.1")
    with pytest.raises(ConfigError, match="TorchScript"):
        check_layer_input(mixed, layer, "0.1", 8)


CHANNELS_LAST_NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Stage(nn.Module):
        """Takes (N, H, W, C) maps, as the stages of timm's Swin, MambaOut or VOLO do."""

        def __init__(self):
            super().__init__()
            self.mix = nn.Linear(6, 6)

        def forward(self, x):
            return x + torch.nn.functional.gelu(self.mix(x))


    class Net(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 4, stride=4)
            self.stage = Stage()
            self.head = nn.Linear(6, num_classes)

        def forward(self, x):
            return self.head(self.stage(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2)))


    def make(num_classes=3):
        torch.manual_seed(0)
        return Net(num_classes)
''')


def _deep_values_config(project, arch: str, layer: str, size: int | None = None):
    """The tiny project's config.yaml rewritten for ``arch`` at ``layer``: deep, values saved."""
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["model"].update({"arch": arch, "checkpoint": None, "layer": layer})
    if size is not None:
        config["preprocess"]["size"] = size
    config["explainer"] = {"name": "deep"}
    config["output"]["save_values"] = True
    path = project / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_and_run_at_a_channels_last_layer(tiny_project):
    """validate says the layer takes (H, W, C) maps; run saves them as (C, H, W) and records the layout."""
    (tiny_project / "nhwc.py").write_text(CHANNELS_LAST_NET)
    path = _deep_values_config(tiny_project, "python:nhwc:make", "stage")
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "# layer input: (H, W, C) maps, saved and drawn as (C, H, W)" in result.output
    result = runner.invoke(app, ["layers", str(path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "channels last" in lines["stage"] and "channels last" not in lines["stem"]
    result = runner.invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tiny_project / "out"
    assert json.loads((out / "run.json").read_text())["layer_tokens"]["layout"] == "(H, W, C)"
    with np.load(out / "values" / "three.bmp.npz") as npz:
        assert npz["values"].shape == (2, 6, 4, 4)


LAYOUT_NETS = textwrap.dedent('''
    import torch
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block
    from timm.models.nest import Nest


    def nest(num_classes=3):
        """timm's NesT: each level keeps (N, blocks, tokens, C)."""
        torch.manual_seed(0)
        return Nest(img_size=64, embed_dims=(24, 32, 48), num_heads=(1, 2, 2), depths=(1, 1, 1),
                    num_classes=num_classes)


    def mobilevit(num_classes=3):
        """timm's MobileViT block at stages.2.1: its transformer takes (N * 4, patches, C) unfolded patches."""
        torch.manual_seed(0)
        cfg = ByoModelCfg(blocks=(_inverted_residual_block(d=1, c=16, s=1, br=2.0),
                                  _inverted_residual_block(d=1, c=24, s=2, br=2.0),
                                  _mobilevit_block(d=1, c=32, s=2, transformer_dim=32, transformer_depth=1,
                                                   patch_size=2, br=2.0)),
                          stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu")
        return ByobNet(cfg, num_classes=num_classes)
''')


def test_validate_and_run_at_blocked_tokens_and_refuse_folded_ones(tiny_project):
    """issue 33 from a config: NesT's level-0 blocks are mapped (validate says so, run.json records it, the
    saved map is the 16x16 grid); MobileViT's unfolded patches are refused at validate (exit 2) naming the
    MobileViT block, which validates."""
    (tiny_project / "layoutnets.py").write_text(LAYOUT_NETS)
    path = _deep_values_config(tiny_project, "python:layoutnets:nest", "levels.0.transformer_encoder.0", size=64)
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "# layer input: (blocks, tokens, C) maps, saved and drawn as (C, H, W)" in result.output
    result = runner.invoke(app, ["run", str(path), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tiny_project / "out"
    found = json.loads((out / "run.json").read_text())["layer_tokens"]
    assert found["layout"] == "(blocks, tokens, C)" and found["blocks"] == [4, 4] and found["block"] == [4, 4]
    with np.load(out / "values" / "three.bmp.npz") as npz:
        assert npz["values"].shape == (2, 24, 16, 16)

    overrides = ["--set", "model.arch=python:layoutnets:mobilevit", "--set", "model.layer=stages.2.1.transformer.0"]
    result = runner.invoke(app, ["validate", str(path), *overrides])
    assert result.exit_code == 2, result.output
    assert "model.layer" in result.output and "'stages.2.1.transformer.0'" in result.output
    assert "e.g. 'stages.2.1'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["validate", str(path), *overrides, "--set", "model.layer=stages.2.1"])
    assert result.exit_code == 0, result.output
