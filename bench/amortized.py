"""Amortized (FastSHAP) vs kernel and partition on the demo model, in one run.

    PYTHONPATH=. python bench/amortized.py [--size 64 --grid 4 --epochs 40 ...] [--out bench/results-amortized.txt]

Training set: random crops (50-100 % of the area) and flips of photos (sample_images/ and
scikit-image's bundled colour photos), one new view per photo per epoch. Held-out photos (never
seen in training): astronaut-02.jpg and skimage's motorcycle_right. For each held-out image and its
top-k classes: per-image time and Pearson r of the player values (the grid patches) against Kernel
SHAP with ``--reference`` evaluations over the same players and fill, for amortized, kernel at
``--budget`` evaluations and partition at ``--budget`` evaluations (its pixel values summed per
patch); deletion/insertion AUCs of each map; training time; the break-even number of images
(training time / (kernel time per image - amortized time per image)).

The defaults are small (64 px input, 4 x 4 players) so that the whole bench fits in about half an
hour of a busy 2-core CPU; on an idle machine or a GPU use ``--size 224 --grid 8`` or more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli import masking, metrics  # noqa: E402
from explain_cli.config import load_config  # noqa: E402
from explain_cli.explainers import amortized, kernel, partition  # noqa: E402
from explain_cli.explainers.base import ExplainContext  # noqa: E402
from explain_cli.images import load_preprocessed  # noqa: E402
from explain_cli.models import build_model  # noqa: E402
from explain_cli.train import pearson_rows, train  # noqa: E402

TRAIN_PHOTOS = ["sample_images/chelsea.jpg", "sample_images/coffee.jpg", "sample_images/more/rocket.jpg",
                "skimage:motorcycle_left.png", "skimage:hubble_deep_field.jpg", "skimage:retina.jpg",
                "skimage:ihc.png"]
HELD_OUT = ["sample_images/astronaut-02.jpg", "skimage:motorcycle_right.png"]


def photo(spec: str) -> Path:
    if spec.startswith("skimage:"):
        import skimage

        return Path(skimage.__file__).parent / "data" / spec.split(":", 1)[1]
    return REPO / spec


def player_values(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N, k, M): the sum of each patch's attributions (channels and pixels)."""
    flat = labels.reshape(-1)
    per_pixel = values.sum(2).reshape(values.shape[0], values.shape[1], -1)
    return np.stack([per_pixel[:, :, flat == j].sum(-1) for j in range(int(flat.max()) + 1)], -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--fill", default="128", help="kernel fill / partition mask / amortized fill (grey 128)")
    ap.add_argument("--epochs", type=int, default=40, help="one random view per training photo per epoch")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--network", default="auto", choices=["auto", "features", "pixels"])
    ap.add_argument("--target-views", type=int, default=4000,
                    help="training views for the arithmetic line (bench/results-amortized.txt's scaling table: "
                         "the views the features network needed to pass kernel@500 at 224 px, 14 x 14)")
    ap.add_argument("--reference", type=int, default=10_000, help="kernel evaluations of the reference")
    ap.add_argument("--budget", type=int, default=500, help="evaluations of kernel and partition")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="deletion/insertion steps")
    ap.add_argument("--out", default=str(REPO / "bench" / "results-amortized.txt"))
    args = ap.parse_args()
    fill = float(args.fill) if args.fill.replace(".", "", 1).isdigit() else args.fill
    torch.set_grad_enabled(False)

    work = Path(tempfile.mkdtemp(prefix="bench-amortized-"))
    try:
        (work / "train").mkdir()
        for spec in TRAIN_PHOTOS:
            src = photo(spec)
            shutil.copy(src, work / "train" / src.name)
        demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        demo["model"]["layer"] = "input"
        demo["preprocess"]["size"] = args.size
        demo["input"] = {"dir": str(work / "train")}
        demo["explainer"] = {"name": "amortized", "segments": {"grid": args.grid}, "fill": fill,
                             "train": {"epochs": args.epochs, "pairs": args.pairs, "width": args.width,
                                       "network": args.network,
                                       "images_per_step": 2, "holdout": 0.0, "augment": True}}
        demo["output"] = {"dir": str(work / "out")}
        demo["device"] = "cpu"
        (work / "cfg.yaml").write_text(yaml.safe_dump(demo))
        cfg = load_config(work / "cfg.yaml")

        t0 = time.perf_counter()
        result = train(cfg, work / "explainer.pt")
        train_seconds = time.perf_counter() - t0

        model = build_model(cfg.model, lambda p: cfg.resolve(p)).eval()
        x = torch.from_numpy(np.stack([load_preprocessed(photo(s), cfg.preprocess)[1] for s in HELD_OUT]))
        mean, std = tuple(cfg.preprocess.mean), tuple(cfg.preprocess.std)
        labels = masking.grid_labels(args.size, args.size, args.grid)
        seeds = list(range(len(HELD_OUT)))

        def context(settings) -> ExplainContext:
            return ExplainContext(model=model, layer=None, layer_name="input", background=x[:0], mean=mean,
                                  std=std, device=torch.device("cpu"), batch_size=64, settings=settings)

        methods = {
            "amortized": amortized.Explainer(context(amortized.Settings(checkpoint=str(work / "explainer.pt")))),
            f"kernel@{args.budget}": kernel.Explainer(context(kernel.Settings(
                segments={"grid": args.grid}, fill=fill, nsamples=args.budget))),
            f"partition@{args.budget}": partition.Explainer(context(partition.Settings(
                mask=fill, max_evals=args.budget))),
        }
        reference = kernel.Explainer(context(kernel.Settings(segments={"grid": args.grid}, fill=fill,
                                                             nsamples=args.reference)))
        network = torch.load(work / "explainer.pt", weights_only=True)["network"]["kind"]
        for explainer in methods.values():  # warm-up with the timed batch shapes (first calls allocate), not timed
            explainer.explain(x, args.top_k, seeds)
        t = time.perf_counter()
        ref = reference.explain(x, args.top_k, seeds)
        ref_seconds = (time.perf_counter() - t) / len(HELD_OUT)
        ref_values = player_values(ref.values, labels)

        rows = []
        for name, explainer in methods.items():
            t = time.perf_counter()
            att = explainer.explain(x, args.top_k, seeds)
            per_image = (time.perf_counter() - t) / len(HELD_OUT)
            assert np.array_equal(att.classes, ref.classes), name
            r = pearson_rows(player_values(att.values, labels), ref_values)
            faith = metrics.faithfulness(model, x, att.values, att.classes, seeds, ["deletion", "insertion"],
                                         args.steps, "blur(32,32)", mean, std, 64,
                                         att.segments)
            rows.append((name, per_image, float(np.median(r)), float(np.min(r)),
                         float(faith.deletion.mean()), float(faith.insertion.mean())))
        t_amo = rows[0][1]
        t_kernel = rows[1][1]
        break_even = train_seconds / (t_kernel - t_amo) if t_kernel > t_amo else float("inf")

        load = os.getloadavg()
        lines = [
            f"# bench/amortized.py {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}",
            f"# demo model (tf_efficientnet_lite0) at {args.size} px, {args.grid}x{args.grid} players, fill {fill}, "
            f"top-{args.top_k} classes of {len(HELD_OUT)} held-out photos ({', '.join(HELD_OUT)})",
            f"# training: {len(TRAIN_PHOTOS)} photos x {args.epochs} epochs = {len(TRAIN_PHOTOS) * args.epochs} "
            f"random crop/flip views, {args.pairs} coalition pairs per view, network {network}, width {args.width}: "
            f"{train_seconds:.1f} s, {result.model_evaluations} model evaluations",
            f"# reference: kernel@{args.reference} ({ref_seconds:.2f} s per image; its split-half stability "
            f"{np.nanmedian(ref.stability):.3f})",
            f"{'method':<16} {'s/image':>9} {'speed-up vs kernel':>19} {'median r':>9} {'min r':>7} "
            f"{'deletion':>9} {'insertion':>10}",
        ]
        for name, per_image, med, low, dele, ins in rows:
            lines.append(f"{name:<16} {per_image:>9.4f} {t_kernel / per_image:>18.1f}x {med:>9.3f} {low:>7.3f} "
                         f"{dele:>9.4f} {ins:>10.4f}")
        lines.append(f"break-even: training pays for itself after {break_even:.0f} images "
                     f"(vs kernel@{args.budget}: {train_seconds:.1f} s / ({t_kernel:.3f} - {t_amo:.4f}) s per image)")
        rate = result.model_evaluations / train_seconds
        lines.append(f"arithmetic: {args.target_views} views x {2 + 2 * args.pairs} evaluations = "
                     f"{args.target_views * (2 + 2 * args.pairs)} model evaluations at this run's training rate "
                     f"({rate:.1f} evaluations/s, explainer updates included) = "
                     f"{args.target_views * (2 + 2 * args.pairs) / rate / 60:.0f} min of training")
        text = "\n".join(lines) + "\n\n"
        print(text, end="")
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
