"""How many coalitions buy how close a kernel map: ours (sampling shap / leverage) vs shap's KernelExplainer.

    python bench/kernel_accuracy.py --model demo --images 2 --size 112
    python bench/kernel_accuracy.py --model resnet18 --images 2 --size 112
    python bench/kernel_accuracy.py --model demo --images 3 --size 224 --seeds 4 --device cuda

The game is the kernel explainer's (configs/kernel.yaml: SLIC with n_segments 50, compactness 30,
sigma 3, the image's mean colour as fill, the top-1 class's logit), on the photos of
sample_images/ resized to --size (default 112 px: about 50 superpixels still, and at the
default settings each model's run took about 17 minutes on one core of a 2-core machine, the two
models side by side). For each image
and each arm, the top class's map is compared with a reference map: the Pearson r of the painted
maps (each superpixel weighted by its area, what an overlay shows). Arms, per budget n (coalitions
= model evaluations per image):

* shap      - ``shap.KernelExplainer(f, zeros).shap_values(ones, nsamples=n, l1_reg=False)``
              (numpy's global generator seeded per run);
* ours-shap     - ours, ``sampling: shap`` (shap's sampling, our own random stream);
* ours-leverage - ours, ``sampling: leverage`` (every subset size equally often, reweighted).

Ours are computed with the explainer's own pieces (``CoalitionSampler``, ``solve``,
``value_covariance``) on the same coalitions an ``explain()`` call with that seed uses (checked
once per run for each sampling): per seed one sampler at the first budget, grown to the next ones
as ``nsamples: auto`` grows it (at 500 coalitions and about 50 superpixels shap's rule enumerates
the subsets of size 1 and 49, as it does at 1000 and 2000, so the grown sampler draws from the same
distribution as a fresh one at that budget). The reference is ours with ``sampling: shap`` at
--reference coalitions. It is noisy too, so every r is also given corrected for attenuation:
r(map, truth) = r(map, reference) / sqrt(reliability of the reference), the reliability being its
variance stability (Covert & Lee's variance, ``variance_stability``, checked against reruns in the
tests); "coalitions needed" uses the corrected errors.

Then two more tables, from the same evaluations:

* stability estimates against what they estimate: for ours at each budget, the split-half
  stability and the variance-based one next to the correlation of the maps of two seeds (a direct
  draw of the reliability both estimate);
* stopping rules on the rounds of the budgets (as ``nsamples: auto`` would stop if its rounds were
  these): the count at which each rule (split-half stability >= 0.9, variance stability >= 0.9,
  Covert & Lee's max std / range <= 0.05 and <= 0.01) stops, and the map's corrected r there.

The shap arm's own model calls are not counted in the printed total; on the CPU the run is
dominated by the model calls (about 25 ms per 112 px image on one core for the demo model).
--device cuda runs the model calls on the GPU (shap's own work and the regressions stay on the CPU).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli import masking  # noqa: E402
from explain_cli.explainers import kernel  # noqa: E402
from explain_cli.stability import split_half_stability  # noqa: E402



def load(model_name: str, n_images: int, size: int, device: str):
    """(model, images (N, C, H, W) on device, preprocess config)."""
    from explain_cli.config import load_config
    from explain_cli.discover import source_path
    from explain_cli.images import load_preprocessed
    from explain_cli.pipeline import RunOptions, prepare

    config = load_config(REPO / "configs" / "kernel.yaml")
    config.preprocess.size = size
    if model_name == "resnet18":
        config.preprocess.mean = [0.485, 0.456, 0.406]
        config.preprocess.std = [0.229, 0.224, 0.225]
    prep = prepare(config, RunOptions(progress=False), device=device)
    images = torch.from_numpy(np.stack([load_preprocessed(source_path(prep.input_dir, rel), config.preprocess)[1]
                                        for rel in prep.images[:n_images]])).to(device)
    model = prep.model
    if model_name == "resnet18":
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None).eval().to(device)
    return model, images, config


class Game:
    """v(z): the top class's logit of the image with the superpixels where z == 0 filled."""

    def __init__(self, model, image: torch.Tensor, preprocess, settings: kernel.Settings, batch: int) -> None:
        mean, std = tuple(preprocess.mean), tuple(preprocess.std)
        pixels = masking.to_pixels(image[None], mean, std)[0]
        self.labels = masking.players(pixels, settings.segments)
        self.m = int(self.labels.max()) + 1
        self.model, self.image, self.batch = model, image, batch
        self.fill = masking.normalise(masking.fill_pixels(pixels, settings.fill), mean, std).to(image)
        self.labels_dev = torch.from_numpy(self.labels.reshape(-1)).to(image.device)
        with torch.no_grad():
            self.cls = int(model(image[None]).argmax(1))
        self.evaluations = 0

    def __call__(self, z: np.ndarray) -> np.ndarray:
        shown = torch.from_numpy(np.asarray(z) > 0.5).to(self.image.device)
        out = []
        with torch.no_grad():
            for a in range(0, shown.shape[0], self.batch):
                rows = masking.compose(shown[a:a + self.batch], self.labels_dev, self.image, self.fill)
                out.append(self.model(rows)[:, self.cls:self.cls + 1].double().cpu())
        self.evaluations += shown.shape[0]
        return torch.cat(out).numpy()


class Ours:
    """One seed's run of our estimator on a game, at a fixed budget or grown in rounds (auto)."""

    def __init__(self, game: Game, n: int, seed: int, sampling: str) -> None:
        self.game = game
        self.sampler = kernel.CoalitionSampler(game.m, n, kernel._rng(seed), sampling)
        self.y = game(self.sampler.masks)
        ends = game(np.stack([np.ones(game.m, bool), np.zeros(game.m, bool)]))
        self.fx, self.fnull = ends[0], ends[1]

    def grow(self, count: int) -> int:
        added = self.sampler.draw(count)
        if added:
            self.y = np.concatenate([self.y, self.game(self.sampler.masks[-added:])])
        return added

    def estimate(self) -> dict:
        s, labels = self.sampler, self.game.labels
        masks, weights = s.masks, s.weights
        phi = kernel.solve(masks, weights, self.y, self.fx, self.fnull)
        cov = kernel.value_covariance(masks, weights, self.y, self.fx, self.fnull, phi, s.unit_array())
        std = np.sqrt(np.maximum(np.einsum("kii->ik", cov), 0))
        halves = kernel.split_half(masks, weights, s.nfixed)
        split = math.nan
        if halves is not None:
            maps = [torch.from_numpy(np.array(masking.paint(kernel.solve(masks, w, self.y, self.fx, self.fnull), labels, 1)))[None]
                    for w in halves]
            sizes = tuple(int((w[s.nfixed:] > 0).sum()) for w in halves)
            split = float(split_half_stability(maps[0], maps[1], sizes)[0, 0])
        return {"phi": phi[:, 0], "n": masks.shape[0], "split": split,
                "variance": float(kernel.variance_stability(phi, cov, labels)[0]),
                "ratio": float(kernel.std_ratio(phi, std)[0])}


def shap_values(game: Game, n: int, seed: int) -> np.ndarray:
    import shap

    np.random.seed(seed)
    explainer = shap.KernelExplainer(game, np.zeros((1, game.m)))
    values = explainer.shap_values(np.ones((1, game.m)), nsamples=n, l1_reg=False, silent=True)
    return np.asarray(values).reshape(game.m)


def r_map(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> float:
    """Pearson r of two painted maps (superpixels weighted by their area)."""
    area = np.bincount(labels.ravel(), minlength=a.size).astype(np.float64)
    area /= area.sum()
    a, b = a - area @ a, b - area @ b
    return float((area @ (a * b)) / math.sqrt((area @ (a * a)) * (area @ (b * b))))


def check_explainer(model, images: torch.Tensor, preprocess, settings: kernel.Settings, game: Game, n: int,
                    seed: int) -> None:
    """The bench's estimate is what ``explain()`` returns for that seed (same coalitions, same solve)."""
    from explain_cli.explainers.base import ExplainContext

    context = ExplainContext(model=model, layer=None, layer_name="input", background=images[:1],
                             mean=tuple(preprocess.mean), std=tuple(preprocess.std), device=images.device,
                             batch_size=game.batch, settings=kernel.Settings(**{**settings.model_dump(), "nsamples": n}))
    result = kernel.Explainer(context).explain(images[:1], 1, [seed])
    ours = Ours(game, n, seed, settings.sampling).estimate()["phi"]
    first = np.array([np.flatnonzero(game.labels.ravel() == j)[0] for j in range(game.m)])
    theirs = result.values[0, 0].sum(0).ravel()[first]
    assert int(result.classes[0, 0]) == game.cls
    assert np.allclose(theirs, ours, rtol=1e-3, atol=1e-4 * np.abs(ours).max()), "bench and explainer differ"


def needed(budgets: list[int], errors: list[float], target: float) -> str:
    """Evaluations at which 1 - r reaches ``target``, log-log interpolated (or extrapolated from the
    last two budgets)."""
    pts = [(b, e) for b, e in zip(budgets, errors) if e > 0]
    if len(pts) < 2:
        return "-"
    for (b0, e0), (b1, e1) in zip(pts, pts[1:]):
        if e1 <= target <= e0 or (b1, e1) == pts[-1]:
            slope = math.log(e1 / e0) / math.log(b1 / b0)
            if slope >= 0:
                return "-"
            return f"{b0 * (target / e0) ** (1 / slope):.0f} (slope {slope:.2f})"
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "resnet18"], default="demo")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--budgets", default="500,1000,2000",
                        help="ours: one sampler per seed, grown from budget to budget (as nsamples auto grows it)")
    parser.add_argument("--shap-budgets", default="500,1000,2000")
    parser.add_argument("--samplings", default="shap,leverage")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--reference", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256, help="rows per model call")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--save", default=None, help="write the raw r values, estimates and rounds to this JSON file")
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    shap_budgets = [int(b) for b in args.shap_budgets.split(",") if b]
    samplings = args.samplings.split(",")
    model, images, config = load(args.model, args.images, args.size, args.device)
    settings = kernel.Settings.model_validate(config.explainer)
    print(f"# bench/kernel_accuracy.py --model {args.model} --images {args.images} --size {args.size} "
          f"--budgets {args.budgets} --shap-budgets {args.shap_budgets} --samplings {args.samplings} "
          f"--seeds {args.seeds} --reference {args.reference} --device {args.device}")
    print(f"# {platform.node()} torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"{args.model} at {args.size} px; segments {settings.segments.model_dump()}, fill {settings.fill}")
    started = time.perf_counter()

    games, refs, ref_stability = [], [], []
    for i in range(images.shape[0]):
        game = Game(model, images[i], config.preprocess, settings, args.batch)
        if i == 0:
            for sampling in samplings:
                check_explainer(model, images, config.preprocess, settings.model_copy(update={"sampling": sampling}),
                                game, 200, 7)
        ref = Ours(game, args.reference, 10_000 + i, "shap").estimate()
        games.append(game)
        refs.append(ref["phi"])
        ref_stability.append(ref["variance"])
        print(f"image {i}: M = {game.m} superpixels, class {game.cls}; reference ({args.reference}): "
              f"variance stability {ref['variance']:.4f}, split-half {ref['split']:.4f}, "
              f"max std / range {ref['ratio']:.4f}  ({time.perf_counter() - started:.0f} s)", flush=True)

    arms = (["shap"] if shap_budgets else []) + [f"ours-{s}" for s in samplings]
    table: dict[str, dict[int, list[float]]] = {a: {n: [] for n in (shap_budgets if a == "shap" else budgets)}
                                                for a in arms}
    calib: dict[str, dict[int, list[tuple[int, float, float, float]]]] = {a: {n: [] for n in budgets} for a in arms[1:]}
    stops: dict[str, list[list[tuple[int, float, float]]]] = {a: [] for a in arms[1:]}
    for i, game in enumerate(games):
        for n in shap_budgets:
            for seed in range(args.seeds):
                table["shap"][n].append(r_map(shap_values(game, n, seed), refs[i], game.labels))
        for arm in arms[1:]:
            runs = []  # per seed: the estimates at each budget (one sampler grown, as nsamples auto grows it)
            for seed in range(args.seeds):
                run = Ours(game, budgets[0], seed * 1000 + i, arm.split("-", 1)[1])
                history = []
                for n in budgets:
                    run.grow(n - run.sampler.masks.shape[0])
                    est = run.estimate()
                    est["r"] = r_map(est["phi"], refs[i], game.labels)
                    table[arm][n].append(est["r"])
                    history.append(est)
                runs.append(history)
                stops[arm].append([(e["n"], e["r"], e["split"], e["variance"], e["ratio"], ref_stability[i])
                                   for e in history])
            for j, n in enumerate(budgets):  # split-half / variance stability vs the seeds' agreement
                for a in range(len(runs)):
                    for b in range(a + 1, len(runs)):
                        rerun = r_map(runs[a][j]["phi"], runs[b][j]["phi"], game.labels)
                        for x in (runs[a][j], runs[b][j]):
                            calib[arm][n].append((i, rerun, x["split"], x["variance"]))
        print(f"  image {i} done ({time.perf_counter() - started:.0f} s)", flush=True)

    # The reference is noisy too: r(map, reference) = r(map, truth) * r(reference, truth) on average,
    # and r(reference, truth) = sqrt(its reliability) (Spearman's correction for attenuation).
    corrected = {a: {n: [r / math.sqrt(ref_stability[idx // args.seeds]) for idx, r in enumerate(rs)]
                     for n, rs in table[a].items()} for a in arms}
    print(f"\nmedian over {len(games)} images x {args.seeds} seeds (top-1 class, painted maps) of r with the reference, "
          "and in brackets 1 - r corrected for the reference's noise (r / sqrt(the reference's variance stability))")
    print(f"{'coalitions':>10}  " + "  ".join(f"{a:>18}" for a in arms))
    all_budgets = sorted(set(budgets) | set(shap_budgets))
    for n in all_budgets:
        cells = []
        for a in arms:
            rs = table[a].get(n)
            cells.append(f"{statistics.median(rs):8.4f} ({1 - statistics.median(corrected[a][n]):.4f})" if rs
                         else f"{'-':>18}")
        print(f"{n:10d}  " + "  ".join(cells))
    # The median of images x seeds jumps between images when they differ in noise; the mean of the
    # corrected error 1 - r is linear in the noise variance (for small noise), so it averages
    # honestly over images and seeds: the "coalitions needed" use it.
    n_img = len(games)
    print("\nmean corrected 1 - r (all images x seeds), then per image")
    print(f"{'coalitions':>10}  " + "  ".join(f"{a:>14}" for a in arms) + "   per image")
    for n in all_budgets:
        cells, per = [], []
        for a in arms:
            rs = corrected[a].get(n)
            if not rs:
                cells.append(f"{'-':>14}")
                continue
            cells.append(f"{1 - float(np.mean(rs)):14.4f}")
            per.append("/".join(f"{1 - float(np.mean(rs[k * args.seeds:(k + 1) * args.seeds])):.3f}" for k in range(n_img)))
        print(f"{n:10d}  " + "  ".join(cells) + "   " + "  ".join(per))
    if shap_budgets:
        def err(a: str, n: int) -> float:
            return max(1 - float(np.mean(corrected[a][n])), 1e-6)
        goal = err("shap", max(shap_budgets))
        print(f"\ncoalitions for shap's {max(shap_budgets)}-coalition mean corrected error {goal:.4f}, "
              "log-log interpolated between budgets (extrapolated past the last):")
        for a in arms[1:]:
            print(f"  {a:>14}: {needed(budgets, [err(a, n) for n in budgets], goal)}")
        if len(shap_budgets) > 1:
            print(f"  {'shap':>14}: {needed(shap_budgets, [err('shap', n) for n in shap_budgets], goal)}")

    if args.seeds >= 2:
        print("\nstability estimates vs the correlation of two seeds' maps (what both estimate), per image: mean over "
              "seed pairs of that correlation, mean (sd) of each estimate over the seeds' runs")
        print(f"{'arm':>14} {'coalitions':>10} {'image':>5}  {'two seeds':>9}  {'split-half (sd)':>16}  {'variance (sd)':>16}")
        for a in arms[1:]:
            for n in budgets:
                for k in range(n_img):
                    rows = [c for c in calib[a][n] if c[0] == k]
                    rerun, split, var = (np.array(c) for c in list(zip(*rows))[1:])
                    print(f"{a:>14} {n:10d} {k:5d}  {rerun.mean():9.4f}  {np.nanmean(split):8.4f} ({np.nanstd(split):.4f})"
                          f"  {var.mean():8.4f} ({var.std():.4f})")
    if args.save:
        import json

        Path(args.save).write_text(json.dumps({"args": vars(args), "r": table, "reference_stability": ref_stability,
                                               "calibration": calib, "rounds": stops}, default=float))

    rules = [("split-half >= 0.9", 2, lambda v: v >= 0.9), ("variance >= 0.9", 3, lambda v: v >= 0.9),
             ("std/range <= 0.05", 4, lambda v: v <= 0.05), ("std/range <= 0.01", 4, lambda v: v <= 0.01)]
    print(f"\nstopping rules on the rounds {budgets} (per image x seed: the count each rule stops at, * = not "
          "reached by the last, and the map's r with the reference there, corrected as above)")
    for a in arms[1:]:
        print(f"{a:>14}  " + "  ".join(f"{name:>20}" for name, _, _ in rules))
        for history in stops[a]:
            cells = []
            for _, col, rule in rules:
                stop = next((h for h in history if rule(h[col])), None)
                h = stop or history[-1]
                cells.append(f"{h[0]:5d}{'*' if stop is None else ' '} r {h[1] / math.sqrt(h[5]):.4f}")
            print(f"{'':>14}  " + "  ".join(f"{c:>20}" for c in cells))
    print(f"# {time.perf_counter() - started:.0f} s; {sum(g.evaluations for g in games)} model evaluations "
          "(ours and the reference; shap's own not counted)")


if __name__ == "__main__":
    main()
