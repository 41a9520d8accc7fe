"""Amortized (FastSHAP) against its untrained prior, kernel and partition: does training buy anything?

    PYTHONPATH=. python bench/amortized.py --truth [--images 2000 --epochs 10 --eval 200]   # known-truth data
    PYTHONPATH=. python bench/amortized.py [--size 64 --grid 4 --epochs 40 ...]             # the demo model

Both append to bench/results-amortized.txt. Rows: the amortized explainer untrained (its prior: the
features network with its learned correction zeroed, i.e. W . (f(x) - f(fill)) / M per patch; the
pixels network with its initial weights), the trained explainer, kernel at ``--budget`` (500)
evaluations, partition at 500 (its pixel values summed per patch), and kernel at the reference's
own budget with other seeds: that row's r is the reference's reliability (two independent runs of
the reference agree that well, which caps every other row's r). r: Pearson over the player values
(the grid patches) against the reference, kernel at ``--reference`` (2000) evaluations over the
same players and fill.

``--truth``: the known-truth data and CNN of bench/truth.py (32 x 32 px, 8 x 8 patches, mean fill,
pixels network); the explainer trains on ``--images`` of the CNN's training images, and is scored on
``--eval`` held-out images of another seed, none within ``--bits`` (4) bits of any training image's
64-bit average hash (those are left out and counted); each image is explained for its true class;
the in-mask share and pointing game of bench/truth.py are given beside r.

The demo model: training set: random crops (50-100 % of the area) and flips of photos
(sample_images/ and scikit-image's bundled colour photos), one new view per photo per epoch.
Held-out photos share no scene with a training photo (HELD_OUT). For each held-out image and its
top-k classes: per-image time, r, deletion/insertion AUCs of each map; training time; the
break-even number of images (training time / (kernel time per image - amortized time per image)).
The defaults are small (64 px input, 4 x 4 players) so that the whole bench fits a busy 2-core CPU;
on an idle machine or a GPU use ``--size 224 --grid 8`` or more.
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
# held out: photos that share no scene with a training photo (skimage's motorcycle_right, the stereo twin
# of the training photo motorcycle_left, was held out before 2026-12-07; camera and coins are greyscale,
# read as RGB)
HELD_OUT = ["sample_images/astronaut-02.jpg", "skimage:camera.png", "skimage:coins.png"]


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
    ap.add_argument("--reference", type=int, default=2000,
                    help="kernel evaluations of the reference (and of the independent run that measures its reliability)")
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

        # the explainer's prior: the features network with its learned correction zeroed (W . (f(x) - f(fill))
        # per patch, over M), the pixels network with its initial weights
        data = torch.load(work / "explainer.pt", weights_only=True)
        torch.manual_seed(0)
        prior = amortized.build_net(data).state_dict()
        if data["network"]["kind"] == "features":
            prior = {k: (torch.zeros_like(v) if k.startswith("out.") else data["state_dict"][k]) for k, v in prior.items()}
        data["state_dict"] = prior
        torch.save(data, work / "untrained.pt")
        methods = {
            "amortized, untrained": amortized.Explainer(context(amortized.Settings(checkpoint=str(work / "untrained.pt")))),
            "amortized": amortized.Explainer(context(amortized.Settings(checkpoint=str(work / "explainer.pt")))),
            f"kernel@{args.budget}": kernel.Explainer(context(kernel.Settings(
                segments={"grid": args.grid}, fill=fill, nsamples=args.budget))),
            f"partition@{args.budget}": partition.Explainer(context(partition.Settings(
                mask=fill, max_evals=args.budget))),
            f"kernel@{args.reference}, other seeds": kernel.Explainer(context(kernel.Settings(
                segments={"grid": args.grid}, fill=fill, nsamples=args.reference))),
        }
        # other seeds than the reference's, so the kernel rows are independent of it
        method_seeds = {name: [s + (1000 if name.startswith("kernel") else 0) + (1000 if "other" in name else 0)
                               for s in seeds] for name in methods}
        reference = kernel.Explainer(context(kernel.Settings(segments={"grid": args.grid}, fill=fill,
                                                             nsamples=args.reference)))
        network = torch.load(work / "explainer.pt", weights_only=True)["network"]["kind"]
        for name in ("amortized", "amortized, untrained"):  # warm-up with the timed batch shapes, not timed
            methods[name].explain(x, args.top_k, seeds)
        t = time.perf_counter()
        ref = reference.explain(x, args.top_k, seeds)
        ref_seconds = (time.perf_counter() - t) / len(HELD_OUT)
        ref_values = player_values(ref.values, labels)

        rows = []
        for name, explainer in methods.items():
            t = time.perf_counter()
            att = explainer.explain(x, args.top_k, method_seeds[name])
            per_image = (time.perf_counter() - t) / len(HELD_OUT)
            assert np.array_equal(att.classes, ref.classes), name
            r = pearson_rows(player_values(att.values, labels), ref_values)
            faith = metrics.faithfulness(model, x, att.values, att.classes, seeds, ["deletion", "insertion"],
                                         args.steps, "blur(32,32)", mean, std, 64,
                                         att.segments)
            rows.append((name, per_image, float(np.median(r)), float(np.min(r)),
                         float(faith.deletion.mean()), float(faith.insertion.mean())))
        t_amo = next(r[1] for r in rows if r[0] == "amortized")
        t_kernel = next(r[1] for r in rows if r[0] == f"kernel@{args.budget}")
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
            f"{'method':<26} {'s/image':>9} {'speed-up vs kernel':>19} {'median r':>9} {'min r':>7} "
            f"{'deletion':>9} {'insertion':>10}",
        ]
        for name, per_image, med, low, dele, ins in rows:
            lines.append(f"{name:<26} {per_image:>9.4f} {t_kernel / per_image:>18.1f}x {med:>9.3f} {low:>7.3f} "
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


def truth_main(argv: list[str]) -> None:
    """The amortized claim on the known-truth data of bench/truth.py (``--truth``; see the module doc)."""
    from explain_cli.explainers import amortized as amortized_mod
    from explain_cli.explainers import partition as partition_mod
    from explain_cli.targets import LABEL, TargetSpec

    from bench import truth

    ap = argparse.ArgumentParser(prog="bench/amortized.py --truth")
    ap.add_argument("--cnn-train", type=int, default=3000, help="training images of the CNN (bench/truth.py's)")
    ap.add_argument("--cnn-epochs", type=int, default=5)
    ap.add_argument("--images", type=int, default=2000, help="training images of the amortized explainer (of the CNN's)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the amortized explainer")
    ap.add_argument("--eval", type=int, default=200, help="held-out images explained")
    ap.add_argument("--bits", type=int, default=4, help="near-duplicate threshold: average-hash Hamming distance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", default="amortized,kernel,partition",
                    help="comma-separated row groups: amortized (trained and untrained), kernel (@500 and the "
                         "independent reference run), partition; the rows are deterministic, so groups run in "
                         "separate processes give the same numbers")
    ap.add_argument("--out", default=str(REPO / "bench" / "results-amortized.txt"))
    args = ap.parse_args(argv)
    groups = {g.strip() for g in args.rows.split(",") if g.strip()}
    started, load_before = time.monotonic(), os.getloadavg()

    x_tr, y_tr, _ = truth.make_data(args.cnn_train, seed=args.seed)
    pool_x, pool_y, pool_m = truth.make_data(1000, seed=args.seed + 10_000)
    # the split: a held-out image within `bits` of any training image's 64-bit average hash is left out
    train_hash = truth.average_hash(x_tr)
    nearest = np.array([int((train_hash != h).sum(1).min()) for h in truth.average_hash(pool_x)])
    keep = np.flatnonzero(nearest > args.bits)[:args.eval]
    excluded = int((nearest[:keep[-1] + 1] <= args.bits).sum())
    x_ev, y_ev, m_ev = pool_x[keep], pool_y[keep], pool_m[keep]
    assert len(x_ev) == args.eval

    torch.manual_seed(args.seed)
    cnn = truth.make_cnn()
    print(f"training the CNN on {args.cnn_train} images", flush=True)
    cnn_seconds = truth.train_model(cnn, x_tr, y_tr, args.cnn_epochs, args.seed)
    for p in cnn.parameters():
        p.requires_grad_(False)
    acc = truth.accuracy(cnn, pool_x, pool_y)
    labels = masking.grid_labels(truth.SIZE, truth.SIZE, 8)
    spec = TargetSpec(entries=(LABEL,), names=truth.CLASSES)
    background = torch.from_numpy(x_tr[:16])

    def run(cls, settings, seed_offset: int, chunk: int = 25):
        """(player values (N, 64) of each image's true class, (N, SIZE, SIZE) maps, s / image)."""
        ctx = ExplainContext(model=cnn, layer=None, layer_name="input", background=background, mean=truth.MEAN,
                             std=truth.STD, device=torch.device("cpu"), batch_size=512, settings=settings)
        expl = cls(ctx)
        players, maps, t0 = [], [], time.monotonic()
        for a in range(0, len(x_ev), chunk):
            xb, yb = torch.from_numpy(x_ev[a:a + chunk]), y_ev[a:a + chunk]
            att = expl.explain(xb, spec.for_batch([(int(c),) for c in yb]),
                               [seed_offset + a + i for i in range(len(yb))])
            players.append(player_values(np.asarray(att.values, dtype=np.float64), labels)[:, 0])
            maps.append(truth.to_map(att.values))
        return np.concatenate(players), np.concatenate(maps), (time.monotonic() - t0) / len(x_ev)

    grid = {"grid": 8}
    print("reference: kernel@2000", flush=True)
    ref, _, ref_s = run(kernel.Explainer, kernel.Settings(segments=grid, fill="mean", nsamples=2000), 0)
    rows = []

    def row(name: str, players: np.ndarray, maps: np.ndarray, per_image: float) -> None:
        r = pearson_rows(players, ref)
        share, point = truth.scores(maps, m_ev)
        rows.append((name, float(np.nanmedian(r)), float(np.nanpercentile(r, 10)), share, point, per_image))
        print(rows[-1], flush=True)

    train_s, history = float("nan"), None
    if "amortized" in groups:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"training the amortized explainer on {args.images} images x {args.epochs} epochs", flush=True)
            path, train_s = truth.train_amortized(cnn, x_tr, Path(tmp), args.images, args.epochs)
            data = torch.load(path, weights_only=True)
            history = data.get("history")
            torch.manual_seed(args.seed)
            data["state_dict"] = amortized_mod.build_net(data).state_dict()
            torch.save(data, Path(tmp) / "untrained.pt")
            for name, checkpoint in (("amortized, the network untrained (its prior: initial weights)",
                                      Path(tmp) / "untrained.pt"),
                                     (f"amortized, trained ({args.images} images x {args.epochs} epochs, "
                                      f"{train_s:.0f} s)", path)):
                row(name, *run(amortized_mod.Explainer, amortized_mod.Settings(checkpoint=str(checkpoint)), 0))
    if "kernel" in groups:
        row("kernel@500 (other seeds)",
            *run(kernel.Explainer, kernel.Settings(segments=grid, fill="mean", nsamples=500), 2_000_000))
        row("kernel@2000, an independent run (other seeds): the reference's reliability",
            *run(kernel.Explainer, kernel.Settings(segments=grid, fill="mean", nsamples=2000), 1_000_000))
    if "partition" in groups:
        row("partition@500 (pixel values summed per patch)",
            *run(partition_mod.Explainer, partition_mod.Settings(max_evals=500), 0))

    load = os.getloadavg()
    lines = [
        f"# bench/amortized.py --truth {' '.join(argv)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"# known-truth data of bench/truth.py (32 x 32 px, 4 classes decided by an 8 x 8 object); its CNN trained on "
        f"{args.cnn_train} images ({cnn_seconds:.0f} s), held-out accuracy {100 * acc:.1f} % (1000 images)",
        f"# players: 8 x 8 patches (4 x 4 px), mean fill; explained: each held-out image's true class",
        f"# split: the amortized explainer trains on the CNN's first {args.images} training images (seed {args.seed}); "
        f"held out: {args.eval} images of another seed with no training image (of all {args.cnn_train}) within "
        f"{args.bits} bits of their 64-bit average hash ({excluded} candidate(s) within it left out; "
        f"min distance of those kept {int(nearest[keep].min())} bits)",
        f"# reference: kernel@2000 ({ref_s:.3f} s / image); r = Pearson over the 64 player values per image, "
        f"median and 10th percentile over the {args.eval} images",
        "",
        "| method | median r vs kernel@2000 | 10th pct r | in-mask share | pointing game | s / image |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, med, low, share, point, per_image in rows:
        lines.append(f"| {name} | {med:.3f} | {low:.3f} | {share:.3f} | {point:.3f} | {per_image:.4f} |")
    lines.append("")
    if history:
        lines.append(f"# amortized training history (last epoch): {history[-1] if isinstance(history, list) else history}")
    lines.append(f"# total {time.monotonic() - started:.0f} s; load average before {load_before[0]:.1f}, after "
                 f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (2-core CPU shared with other jobs)")
    text = "\n".join(lines) + "\n\n"
    print(text, end="")
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(text)


if __name__ == "__main__":
    if "--truth" in sys.argv[1:]:
        truth_main([a for a in sys.argv[1:] if a != "--truth"])
    else:
        main()
