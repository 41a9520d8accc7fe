"""The partition (Owen values) explainer: equality with shap's PartitionExplainer + Image masker,
additivity, batch independence, the eval budget, and settings validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from explain_cli.config import load_config, validate_explainer
from explain_cli.errors import ConfigError
from explain_cli.explainers import partition
from explain_cli.explainers.base import ExplainContext

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SIZE = 16
# Values agree with shap's to ~1e-9 (measured): the queue bookkeeping is the same float64
# arithmetic and the masked images are bitwise equal; what is left is float32 model-output noise
# from different batch compositions and our float32 values. The tolerance leaves room for that.
ATOL, RTOL = 1e-6, 1e-5


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.mean((2, 3)))


class CountingModel(nn.Module):
    """Counts the rows (model evaluations) it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rows = 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.inner(x)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():  # larger weights: outputs spread over a few units
        for p in net.parameters():
            p.mul_(3)
    return net


def make_pixels(n: int, seed: int = 0, shape: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    """(n, H, W, 3) uint8 images: coarse blocks plus noise (so inpainting and blur have structure)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n, h // 4 + 1, w // 4 + 1, 3))
    img = np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)[:, :h, :w]
    img = img + rng.integers(-25, 26, (n, h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def normalise(pixels: np.ndarray) -> torch.Tensor:
    """As the pipeline (images.normalise): uint8 NHWC -> float32 NCHW."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def make(model, mask, max_evals=200, batch_size=50, model_batch=64, layer=None):
    context = ExplainContext(
        model=model, layer=layer, layer_name="input" if layer is None else "conv2",
        background=torch.zeros(1, 3, SIZE, SIZE),  # not used by the partition explainer
        mean=MEAN, std=STD, device=torch.device("cpu"),
        batch_size=model_batch,
        settings=partition.Settings(mask=mask, max_evals=max_evals, batch_size=batch_size))
    return partition.Explainer(context)


def shap_function(model):
    """The model as shap's Image masker wants it: NHWC on the 0-255 scale, normalised inside."""
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)

    def f(nhwc):
        x = torch.from_numpy(np.asarray(nhwc, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            return model((x / 255.0 - mean) / std).numpy()

    return f


def shap_mask_value(mask, shape):
    """Our mask setting as shap.maskers.Image's mask_value (an [r, g, b] colour: a full image)."""
    if isinstance(mask, list):
        return np.broadcast_to(np.asarray(mask, np.float64), shape).copy()
    return mask


@pytest.mark.parametrize("mask, batch_size, n_images, shape, max_evals", [
    ("blur(8,8)", 50, 2, (SIZE, SIZE), 200),
    ("blur(128,128)", 50, 1, (SIZE, SIZE), 200),  # kernel larger than the image
    ("inpaint_telea", 50, 2, (SIZE, SIZE), 200),
    ("inpaint_ns", 20, 1, (SIZE, SIZE), 200),     # another shap batch_size: another order, still equal
    (0.0, 50, 1, (SIZE, SIZE), 200),
    ([255.0, 128.0, 0.0], 50, 1, (SIZE, SIZE), 200),
    # Odd sizes (uneven halves) and a budget that reaches the pixel-channel splits.
    ("inpaint_telea", 13, 1, (7, 5), 400),
    ("blur(3,3)", 50, 1, (5, 7), 400),
])
def test_agrees_with_shap(model, mask, batch_size, n_images, shape, max_evals):
    import shap
    pixels = make_pixels(n_images, seed=3, shape=shape)
    k = 2
    hwc = (*shape, 3)

    counting = CountingModel(model)
    ours = make(counting, mask, max_evals=max_evals, batch_size=batch_size, model_batch=37).explain(
        normalise(pixels), k, list(range(n_images)))
    assert ours.values.shape == (n_images, k, 3, *shape)

    f = shap_function(model)
    shap_rows = 0
    for i in range(n_images):
        calls = []

        def counted(x, calls=calls):
            calls.append(len(x))
            return f(x)

        # One explainer (and masker) per image: shap's blur cache is keyed on id() of a temporary.
        masker = shap.maskers.Image(shap_mask_value(mask, hwc), hwc)
        explainer = shap.Explainer(counted, masker, output_names=[str(c) for c in range(5)])
        assert type(explainer).__name__ == "PartitionExplainer"
        sv = explainer(pixels[i:i + 1].astype(np.float32), max_evals=max_evals, batch_size=batch_size,
                       outputs=shap.Explanation.argsort.flip[:k], silent=True)
        shap_rows += sum(calls)

        reference = sv.values[0].transpose(3, 2, 0, 1)  # (H, W, C, k) -> (k, C, H, W)
        assert [int(c) for c in sv.output_names] == list(ours.classes[i])
        np.testing.assert_allclose(ours.values[i], reference, atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(ours.base_values[i], sv.base_values[0], atol=ATOL, rtol=RTOL)
        np.testing.assert_allclose(ours.outputs[i], f(pixels[i:i + 1].astype(np.float32))[0, ours.classes[i]],
                                   atol=ATOL, rtol=RTOL)
        assert np.corrcoef(ours.values[i].ravel(), reference.ravel())[0, 1] > 0.999999
    # The same number of model evaluations as shap (max_evals, or one more when a pair overshoots).
    assert counting.rows == shap_rows
    assert counting.rows <= n_images * (max_evals + 1)


def test_tree_is_shaps_image_partition():
    import shap
    for shape in [(5, 6, 3), (4, 4, 1), (3, 7, 2)]:
        clustering = shap.maskers.Image("blur(3,3)", shape).clustering
        tree = partition._build_tree(shape)
        m = tree.n_leaves

        def leaves_shap(i):
            if i < m:
                return frozenset([i])
            return leaves_shap(int(clustering[i - m, 0])) | leaves_shap(int(clustering[i - m, 1]))

        def leaves_ours(i):
            if i < m:
                return frozenset([i])
            return leaves_ours(int(tree.left[i])) | leaves_ours(int(tree.right[i]))

        theirs = {leaves_shap(i + m): (leaves_shap(int(l)), leaves_shap(int(r)))
                  for i, (l, r) in enumerate(clustering[:, :2])}
        ours = {leaves_ours(i): (leaves_ours(int(tree.left[i])), leaves_ours(int(tree.right[i])))
                for i in range(m, 2 * m - 1)}
        assert ours == theirs  # same splits, same left/right order
        assert tree.root == 2 * m - 2 and int(clustering[-1, 3]) == m


@pytest.mark.parametrize("mask", ["blur(8,8)", "inpaint_telea", 128])
def test_additivity(model, mask):
    result = make(model, mask, max_evals=150).explain(normalise(make_pixels(2, seed=5)), 3, [0, 1])
    np.testing.assert_allclose(result.shap_sum, result.outputs - result.base_values, atol=1e-9)
    assert result.additivity_error.max() < 1e-9
    np.testing.assert_allclose(result.values.reshape(2, 3, -1).sum(2), result.shap_sum, atol=1e-4)


@pytest.mark.parametrize("mask", ["blur(8,8)", "inpaint_telea"])
def test_batch_independence(model, mask):
    images = normalise(make_pixels(3, seed=7))
    explainer = make(model, mask, max_evals=100, batch_size=20, model_batch=23)
    together = explainer.explain(images, 2, [1, 2, 3])
    for i in range(3):
        alone = explainer.explain(images[i:i + 1], 2, [99])  # seeds are ignored
        np.testing.assert_array_equal(alone.classes[0], together.classes[i])
        np.testing.assert_allclose(alone.values[0], together.values[i], atol=1e-7, rtol=1e-6)
        np.testing.assert_allclose(alone.base_values[0], together.base_values[i], atol=1e-6)


def test_tiny_budget_spreads_credit_evenly(model):
    # max_evals=2: only f(x) and f(masked) are evaluated; the root's credit is spread evenly.
    result = make(model, "blur(8,8)", max_evals=2).explain(normalise(make_pixels(1)), 1, [0])
    expected = (result.outputs - result.base_values)[0, 0] / (3 * SIZE * SIZE)
    np.testing.assert_allclose(result.values[0, 0], expected, rtol=1e-6)


def test_layer_target_is_refused(model):
    with pytest.raises(ConfigError) as info:
        make(model, "blur(8,8)", layer=model.conv2).explain(normalise(make_pixels(1)), 1, [0])
    assert info.value.key == "model.layer"


def test_images_per_step_fills_a_model_batch(model):
    assert make(model, 0, batch_size=50, model_batch=64).images_per_step == 8
    assert make(model, 0, batch_size=10, model_batch=256).images_per_step == 26


@pytest.mark.parametrize("given, canonical", [
    ("inpaint_telea", "inpaint_telea"),
    (" Inpaint_NS ", "inpaint_ns"),
    ("blur( 128, 64 )", "blur(128,64)"),
    (0, 0.0),
    (127.5, 127.5),
    ([255, 0, 10], [255.0, 0.0, 10.0]),
])
def test_mask_settings_accepted(given, canonical):
    settings = validate_explainer({"name": "partition", "mask": given})
    assert settings.mask == canonical
    assert settings.max_evals == 500 and settings.batch_size == 50


@pytest.mark.parametrize("given, fragment", [
    ("inpaint_tela", "did you mean 'inpaint_telea'"),
    ("blur(0,3)", ">= 1"),
    ("blur(3)", "blur(KX,KY)"),
    ("gaussian", "inpaint_telea, inpaint_ns, blur(KX,KY)"),
    (300, "between 0 and 255"),
    ([1, 2], "[r, g, b]"),
    ([1, 2, 300], "between 0 and 255"),
    (True, "inpaint_telea"),
    ({"r": 1}, "inpaint_telea"),
])
def test_bad_mask_names_the_key(given, fragment):
    with pytest.raises(ConfigError) as info:
        validate_explainer({"name": "partition", "mask": given}, "cfg.yaml")
    assert info.value.key == "explainer.mask"
    assert fragment in str(info.value)
    assert "cfg.yaml" in str(info.value)


def test_bad_numbers_and_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate_explainer({"name": "partition", "max_evals": 1})
    assert info.value.key == "explainer.max_evals" and ">= 2" in str(info.value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "torchvision:resnet18", "weights": "random"}, "input": {"dir": "x"},
                                    "explainer": {"name": "partition", "mask": "blur(128,128)"}}))
    assert load_config(path).explainer_settings.mask == "blur(128,128)"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["explainer.mask=inpaint-telea"])
    assert info.value.key == "explainer.mask" and "did you mean 'inpaint_telea'" in str(info.value)
