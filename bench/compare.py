"""explain-cli's engine vs the shap library vs the bare model, on the same job, in one process.

    python bench/compare.py --explainer gradient --model lite0 --images 2 --device cpu
    python bench/compare.py --explainer partition --model lite0 --images 2 --mask "blur(128,128)"

Arms (run interleaved: shap, ours, bare, shap, ours, bare, ...; medians reported, since a
2-core machine is noisy):

* shap   - the shap library used the way the seed notebooks use it (GradientExplainer((model,
           layer)) with ranked_outputs, DeepExplainer, Explainer(f, maskers.Image(...)),
           KernelExplainer over SLIC superpixels).
* ours   - explain-cli's explainer, the same class and call `explain-cli run` uses
           (pipeline.make_explainer -> explain_with_backoff, images_per_step images per call).
* render - our overlay rendering of the same results (reported separately, not in "ours").
* bare   - the model alone for the same number of model evaluations at the same batch size:
           forward only (partition, kernel) or forward + one backward to the input/layer
           (gradient, deep).

Columns: median seconds, images/s, shap time / arm time ("x vs shap", higher is better),
arm time / bare time ("x bare", 1.0 means no overhead beyond the model), peak memory above the
arm's starting point (CPU: process RSS sampled every 5 ms; CUDA: torch's peak allocation).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli.config import PreprocessConfig, load_config  # noqa: E402
from explain_cli.discover import discover_images  # noqa: E402
from explain_cli.images import load_preprocessed  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# -- measurement --------------------------------------------------------------------------

class PeakMemory:
    """Peak memory above the starting point while the block runs (MB)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._start = self._rss_mb()
            self._stop = threading.Event()
            self._max = self._start

            def sample() -> None:
                while not self._stop.wait(0.005):
                    self._max = max(self._max, self._rss_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._max, self._rss_mb()) - self._start


@dataclass
class Arm:
    name: str
    fn: Callable[[], object]
    times: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)
    failure: str | None = None
    result: object = None


def timed(arm: Arm, device: torch.device) -> None:
    if arm.failure:
        return
    try:
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            arm.result = arm.fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            arm.times.append(time.perf_counter() - start)
        arm.peaks.append(mem.peak_mb)
    except Exception as exc:  # noqa: BLE001 - a failing arm (shap breaking) is a result
        arm.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"


# -- models and data ----------------------------------------------------------------------

def build_model(name: str) -> tuple[torch.nn.Module, str]:
    """The benchmark models; lite0 is the demo's pretrained model (configs/demo.yaml)."""
    if name == "lite0":
        from explain_cli.models import build_model as build

        cfg = load_config(REPO / "configs" / "demo.yaml")
        return build(cfg.model, cfg.resolve), "blocks.2"
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(weights=None).eval(), "layer2"
    if name == "vgg11":  # shap's DeepExplainer needs the in-place ReLUs switched off
        model = torchvision.models.vgg11(weights=None).eval()
        for module in model.modules():
            if isinstance(module, torch.nn.ReLU):
                module.inplace = False
        return model, "features.6"
    raise SystemExit(f"unknown --model {name}")


def load_images(count: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """``count`` photos from sample_images (cycled, mirrored on the second pass): uint8 NHWC, NCHW."""
    cfg = PreprocessConfig(size=size)
    root = REPO / "sample_images"
    pixels, tensors = [], []
    for path in discover_images(root, ["*.jpg", "*.png", "*.jpeg"], []):
        p, t = load_preprocessed(root / path, cfg)
        pixels.append(p)
        tensors.append(t)
    out_p, out_t = [], []
    for i in range(count):
        p, t = pixels[i % len(pixels)], tensors[i % len(tensors)]
        if (i // len(pixels)) % 2:
            p, t = p[:, ::-1].copy(), t[:, :, ::-1].copy()
        out_p.append(p)
        out_t.append(t)
    return np.stack(out_p), torch.from_numpy(np.stack(out_t))


# -- the arms -----------------------------------------------------------------------------

def our_explainer(args, model, layer_name, background, device):
    """The explainer exactly as `explain-cli run` builds it (pipeline.make_explainer)."""
    from explain_cli import explainers
    from explain_cli.explainers.base import ExplainContext
    from explain_cli.models import resolve_layer

    module = explainers.get(args.explainer)
    settings = module.Settings(**explainer_settings(args))
    context = ExplainContext(model=model, layer=resolve_layer(model, layer_name), layer_name=layer_name,
                             background=background, mean=MEAN, std=STD, device=device,
                             batch_size=args.batch_size, settings=settings)
    return module.Explainer(context)


def explainer_settings(args) -> dict:
    if args.explainer == "gradient":
        return {"name": "gradient", "nsamples": args.nsamples, "path": "input"}  # shap's quantity
    if args.explainer == "deep":
        return {"name": "deep"}
    if args.explainer == "partition":
        return {"name": "partition", "mask": args.mask, "max_evals": args.max_evals, "batch_size": 50}
    return {"name": "kernel", "nsamples": args.nsamples,
            "segments": {"n_segments": 50, "compactness": 30, "sigma": 3}}


def run_ours(explainer, images: torch.Tensor, top_k: int):
    from explain_cli.pipeline import explain_with_backoff

    step = getattr(explainer, "images_per_step", 8)
    results = []
    for start in range(0, images.shape[0], step):
        chunk = images[start:start + step]
        results.append(explain_with_backoff(explainer, chunk, top_k, list(range(start, start + len(chunk)))))
    return results


def bare_model(model, layer, rows: int, batch_size: int, example: torch.Tensor, backward: bool) -> int:
    """The model alone: ``rows`` evaluations in batches, with one backward to the input/layer."""
    from explain_cli.explainers._utils import capture_layer_input, frozen_parameters

    with frozen_parameters(model):
        done = 0
        while done < rows:
            n = min(batch_size, rows - done)
            x = example[:1].expand(n, -1, -1, -1).clone()
            if not backward:
                with torch.inference_mode():
                    model(x)
            elif layer is None:
                x.requires_grad_(True)
                torch.autograd.grad(model(x)[:, 0].sum(), x)
            else:
                with capture_layer_input(layer, make_leaf=True) as captured:
                    out = model(x)
                torch.autograd.grad(out[:, 0].sum(), captured.value)
            done += n
    return rows


def shap_arm(args, model, layer, pixels: np.ndarray, images: torch.Tensor, background: torch.Tensor,
             device) -> Callable[[], object]:
    import shap

    k = args.top_k
    if args.explainer == "gradient":
        def go():
            target = model if layer is None else (model, layer)
            explainer = shap.GradientExplainer(target, background)
            return explainer.shap_values(images, ranked_outputs=k, nsamples=args.nsamples)
        return go

    if args.explainer == "deep":
        def go():
            explainer = shap.DeepExplainer(model if layer is None else (model, layer), background)
            return explainer.shap_values(images, ranked_outputs=k, check_additivity=False)
        return go

    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def predict_nhwc(x: np.ndarray) -> np.ndarray:
        """The notebooks' f: NHWC 0-255 numpy -> model outputs."""
        t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32, device=device)
        t = (t.permute(0, 3, 1, 2) / 255.0 - mean) / std
        with torch.no_grad():
            return model(t).cpu().numpy()

    if args.explainer == "partition":
        def go():
            masker = shap.maskers.Image(args.mask, pixels[0].shape)
            explainer = shap.Explainer(predict_nhwc, masker)
            return explainer(pixels.astype(np.float32), max_evals=args.max_evals, batch_size=50,
                             outputs=shap.Explanation.argsort.flip[:k])
        return go

    from skimage.segmentation import slic

    def go():  # seed notebook 004: one KernelExplainer per image over its SLIC superpixels
        out = []
        for img in pixels:
            segments = slic(img, n_segments=50, compactness=30, sigma=3, start_label=0)
            fill = img.reshape(-1, 3).mean(0)
            n_seg = int(segments.max()) + 1

            def f(z, img=img, segments=segments, fill=fill):
                batch = np.repeat(img[None].astype(np.float32), z.shape[0], 0)
                for row in range(z.shape[0]):
                    for s in np.flatnonzero(z[row] == 0):
                        batch[row][segments == s] = fill
                return predict_nhwc(batch)

            explainer = shap.KernelExplainer(f, np.zeros((1, n_seg)))
            out.append(explainer.shap_values(np.ones((1, n_seg)), nsamples=args.nsamples, silent=True))
        return out
    return go


def evaluations(args, n_images: int, n_background: int) -> tuple[int, bool]:
    """Model evaluations of our method for the same job, and whether they include a backward."""
    if args.explainer == "gradient":
        return n_images * args.nsamples, True
    if args.explainer == "deep":
        return n_images * n_background, True
    if args.explainer == "partition":
        return n_images * args.max_evals, False
    return n_images * (args.nsamples + 2), False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--explainer", choices=["gradient", "deep", "partition", "kernel"], default="gradient")
    parser.add_argument("--model", choices=["lite0", "resnet18", "vgg11"], default="lite0")
    parser.add_argument("--layer", default=None, help="'input' or a dotted layer (default: the model's usual one "
                                                      "for gradient/deep; input for the others)")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--background", type=int, default=8, help="background images (gradient, deep)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=None, help="gradient: 200; kernel: 1000")
    parser.add_argument("--max-evals", type=int, default=500)
    parser.add_argument("--mask", default="blur(128,128)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-shap", action="store_true")
    args = parser.parse_args()
    if args.nsamples is None:
        args.nsamples = 1000 if args.explainer == "kernel" else 200

    device = torch.device(args.device)
    model, default_layer = build_model(args.model)
    model = model.to(device).eval()
    shap_model = copy.deepcopy(model)  # shap gets the model as a notebook has it (contiguous NCHW)
    from explain_cli.models import to_channels_last

    model = to_channels_last(model)  # as `explain-cli run` prepares it; the bare model runs this too
    layer_name = args.layer or (default_layer if args.explainer in ("gradient", "deep") else "input")
    if args.explainer in ("partition", "kernel"):
        layer_name = "input"
    from explain_cli.models import resolve_layer

    layer = resolve_layer(model, layer_name)
    pixels, images = load_images(args.images, args.size)
    _, bg = load_images(args.background + args.images, args.size)
    background = bg[args.images:].to(device)  # never the explained images themselves
    images = images.to(device)

    explainer = our_explainer(args, model, layer_name, background, device)
    ours = Arm("explain-cli", lambda: run_ours(explainer, images, args.top_k))
    arms = []
    if not args.skip_shap:
        # shap has its own copy (see above): its DeepExplainer leaves hooks on a model when it fails
        shap_layer = resolve_layer(shap_model, layer_name)
        arms.append(Arm("shap", shap_arm(args, shap_model, shap_layer, pixels, images, background, device)))
    arms.append(ours)
    rows_holder: dict = {}

    def bare():
        rows, backward = evaluations(args, args.images, background.shape[0])
        rows_holder["rows"], rows_holder["backward"] = rows, backward
        return bare_model(model, layer, rows, args.batch_size, images, backward)

    bare_arm = Arm("bare model", bare)
    arms.append(bare_arm)

    def render():
        from explain_cli.render import render_overlay
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            index = 0
            for result in ours.result:
                for j in range(result.values.shape[0]):
                    index += 1
                    render_overlay(pixels[index - 1], result.values[j], ["a (0.5)"] * result.values.shape[1],
                                   Path(tmp) / f"{index}.svg", fmt="svg", dpi=100,
                                   segments=None if result.segments is None else result.segments[j])
    render_arm = Arm("render (svg)", render)

    # warm-up (first-call costs: allocator, kernels, lazy imports) is not timed; shap's arm is
    # skipped here only because on a CPU it costs minutes (its first-call costs land in one of
    # the repeats, which the median discards)
    for arm in arms:
        if arm.name == "shap" and device.type == "cpu":
            continue
        timed(arm, device)
        arm.times.clear()
        arm.peaks.clear()
    for _ in range(args.repeats):
        for arm in arms:
            timed(arm, device)
    timed(render_arm, device)
    arms.append(render_arm)

    base = {a.name: statistics.median(a.times) for a in arms if a.times}
    shap_t, bare_t = base.get("shap"), base.get("bare model")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"# {' '.join(sys.argv)}")
    print(f"# machine: {gpu or cpu}; {torch.get_num_threads()} CPU threads; torch {torch.__version__}")
    settings = explainer_settings(args)
    print(f"# job: {args.explainer} on {args.model} at {layer_name}, {args.images} images {args.size}px, "
          f"top-{args.top_k}, {settings}, background {background.shape[0]}, batch_size {args.batch_size}; "
          f"bare model = {rows_holder.get('rows')} evaluations"
          f"{' with backward' if rows_holder.get('backward') else ''}; median of {args.repeats}")
    print(f"| {'arm':<14} | {'seconds':>8} | {'images/s':>8} | {'x vs shap':>9} | {'x bare':>6} | {'peak MB':>8} |")
    print(f"|{'-' * 16}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 8}|{'-' * 10}|")
    for arm in arms:
        if arm.failure:
            print(f"| {arm.name:<14} | failed: {arm.failure}")
            continue
        t = base[arm.name]
        vs_shap = f"{shap_t / t:9.1f}" if shap_t and arm.name != "render (svg)" else f"{'-':>9}"
        vs_bare = f"{t / bare_t:6.2f}" if bare_t and arm.name != "render (svg)" else f"{'-':>6}"
        print(f"| {arm.name:<14} | {t:8.2f} | {args.images / t:8.2f} | {vs_shap} | {vs_bare} | "
              f"{max(arm.peaks):8.0f} |")


if __name__ == "__main__":
    main()
