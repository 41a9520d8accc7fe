"""How many model evaluations buy how close a map: our gradient estimators vs shap's GradientExplainer.

    python bench/accuracy.py --model demo --target layer --images 2 --budgets 16,64,256
    python bench/accuracy.py --model resnet18 --target input --images 2 --budgets 16,64,256

For each budget n (samples = model evaluations per image; each is one forward + one backward for
the top-1 class) and each arm, the map of each image's top class is compared with a reference map
(Pearson r of the channel-summed maps, the numbers an overlay shows); the table has the median over
images and seeds. Arms:

* shap        - ``shap.GradientExplainer(model or (model, layer), background).shap_values(x,
                ranked_outputs=1, nsamples=n)`` (independent draws of reference and t);
* random      - ours, ``sampling: random`` (shap's estimator: independent draws);
* stratified  - ours, ``sampling: stratified`` (balanced references, t stratified per reference);
* layer       - ours at a layer with ``path: layer`` (a different quantity: its own reference), plus
                the median relative additivity error |shap_sum - (output - base)| / |output - base|.

The reference is not a Monte-Carlo run: a midpoint rule with ``--reference`` points per background
image (deterministic), i.e. expected gradients = the mean over references of integrated gradients
computed by quadrature; its own error is reported (r between the rule with R/2 and R points), so a
reader sees how far the reference itself can be trusted. shap's own 8192-sample run would cost
8192 evaluations per image: ~10 min per image for the demo model on 2 CPU cores.

Models: ``demo`` is configs/demo.yaml's EfficientNet-Lite0 (ImageNet weights) with its 3 sample
images as background; ``resnet18`` is torchvision's resnet18 with random weights (seed 0) at
--size pixels (default 112, to fit a 2-core machine), the same images and background, explained at
``layer3.0`` (a whole residual block: its input feeds both branches inside it). At a layer *inside*
a block (``layer3.0.conv1``) shap differs from both our paths: its gradient with respect to the
captured input tensor also flows through the block's identity branch, which reads the same tensor.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli.explainers import gradient  # noqa: E402
from explain_cli.explainers.base import ExplainContext  # noqa: E402


def load(model_name: str, n_images: int, size: int, layer_name: str | None):
    """(model, layer name for --target layer, images, background, mean, std)."""
    from explain_cli.config import load_config
    from explain_cli.images import load_preprocessed
    from explain_cli.discover import source_path
    from explain_cli.pipeline import RunOptions, load_background, prepare

    config = load_config(REPO / "configs" / "demo.yaml")
    if model_name == "resnet18":
        config.preprocess.size = size
        config.preprocess.mean = [0.485, 0.456, 0.406]
        config.preprocess.std = [0.229, 0.224, 0.225]
    prep = prepare(config, RunOptions(progress=False), device="cpu")
    background = load_background(prep)
    images = torch.from_numpy(np.stack([load_preprocessed(source_path(prep.input_dir, rel), config.preprocess)[1]
                                        for rel in prep.images[:n_images]]))
    if model_name == "demo":
        return prep.model, layer_name or config.model.layer, images, background, config.preprocess
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    layer_name = layer_name or "layer3.0"
    return model, layer_name, images, background, config.preprocess


def midpoint_design(n: int, n_refs: int, generator: torch.Generator, stratified: bool):
    """The reference's deterministic design: every background image ``n // B`` times, t on the
    midpoints of equal intervals (no randomness)."""
    per = n // n_refs
    rind = torch.arange(n_refs).repeat_interleave(per)
    t = ((torch.arange(per, dtype=torch.float64) + 0.5) / per).repeat(n_refs)
    return rind, t


def ours(model, layer, layer_name, background, preprocess, images, n: int, seed: int, **settings):
    context = ExplainContext(model=model, layer=layer, layer_name=layer_name, background=background,
                             mean=tuple(preprocess.mean), std=tuple(preprocess.std), device=torch.device("cpu"),
                             batch_size=64, settings=gradient.Settings(nsamples=n, **settings))
    return gradient.Explainer(context).explain(images, 1, [seed * 1000 + i for i in range(images.shape[0])])


def reference(model, layer, layer_name, background, preprocess, images, points: int, path: str):
    original = gradient.draw_design
    gradient.draw_design = midpoint_design
    try:
        # both halves get the same grid of `points` midpoints per background image
        result = ours(model, layer, layer_name, background, preprocess, images, 2 * points * background.shape[0], 0,
                      path=path)
    finally:
        gradient.draw_design = original
    return result


def shap_maps(model, layer, background, images, n: int, seed: int) -> np.ndarray:
    import shap

    explainer = shap.GradientExplainer(model if layer is None else (model, layer), background)
    values, _ = explainer.shap_values(images, ranked_outputs=1, nsamples=n, rseed=seed)
    return np.moveaxis(np.asarray(values), -1, 1)  # (N, 1, *explained shape)


def r_maps(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per image: Pearson r of the channel-summed top-1 maps."""
    out = []
    for i in range(a.shape[0]):
        x, y = a[i, 0].sum(0).ravel(), b[i, 0].sum(0).ravel()
        out.append(float(np.corrcoef(x, y)[0, 1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "resnet18"], default="demo")
    parser.add_argument("--target", choices=["input", "layer"], default="layer")
    parser.add_argument("--layer", default=None, help="layer for --target layer (default: the demo's blocks.3, "
                        "resnet18's layer3.0)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=112, help="resnet18 input size")
    parser.add_argument("--budgets", default="16,64,256")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--reference", type=int, default=64, help="midpoint points per background image")
    parser.add_argument("--arms", default="shap,random,stratified,layer")
    args = parser.parse_args()
    torch.set_grad_enabled(True)

    model, layer_name, images, background, preprocess = load(args.model, args.images, args.size, args.layer)
    layer = None if args.target == "input" else model.get_submodule(layer_name)
    name = "input" if layer is None else layer_name
    budgets = [int(b) for b in args.budgets.split(",")]
    arms = args.arms.split(",")
    print(f"# bench/accuracy.py --model {args.model} --target {args.target} --layer {args.layer} --images {args.images} "
          f"--budgets {args.budgets} --seeds {args.seeds} --reference {args.reference}")
    print(f"# {platform.node()} torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"background {background.shape[0]} images; explained: {name}")

    started = time.perf_counter()
    ref = reference(model, layer, name, background, preprocess, images, args.reference, "input")
    half = reference(model, layer, name, background, preprocess, images, args.reference // 2, "input")
    print(f"reference (shap's quantity, midpoint {args.reference} per reference): r(R/2, R) median "
          f"{statistics.median(r_maps(half.values, ref.values)):.4f}  ({time.perf_counter() - started:.0f} s)")
    ref_layer = None
    if layer is not None and "layer" in arms:
        ref_layer = reference(model, layer, name, background, preprocess, images, args.reference, "layer")
        half_layer = reference(model, layer, name, background, preprocess, images, args.reference // 2, "layer")
        rel = np.abs(ref_layer.additivity_error) / np.abs(ref_layer.outputs - ref_layer.base_values)
        print(f"reference (path layer): r(R/2, R) median {statistics.median(r_maps(half_layer.values, ref_layer.values)):.4f}; "
              f"relative additivity error {np.median(rel):.4f}")

    header = f"{'samples':>7}  " + "  ".join(f"{a:>11}" for a in arms) + "  layer-additivity"
    print("median r with the reference (top-1 class, channel sums)")
    print(header)
    for n in budgets:
        cells, additivity = [], ""
        for arm in arms:
            rs, rels = [], []
            for seed in range(args.seeds):
                if arm == "shap":
                    rs += r_maps(shap_maps(model, layer, background, images, n, seed), ref.values)
                elif arm in ("random", "stratified"):
                    result = ours(model, layer, name, background, preprocess, images, n, seed, path="input",
                                  sampling=arm)
                    rs += r_maps(result.values, ref.values)
                elif arm == "layer" and ref_layer is not None:
                    result = ours(model, layer, name, background, preprocess, images, n, seed, path="layer")
                    rs += r_maps(result.values, ref_layer.values)
                    rels += list((np.abs(result.additivity_error) / np.abs(result.outputs - result.base_values)).ravel())
            cells.append(f"{statistics.median(rs):11.4f}" if rs else f"{'-':>11}")
            if rels:
                additivity = f"{statistics.median(rels):.4f}"
        print(f"{n:7d}  " + "  ".join(cells) + f"  {additivity}", flush=True)
    print(f"# {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
