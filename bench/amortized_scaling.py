"""How the amortized explainer's accuracy grows with training data, for two network designs.

    PYTHONPATH=. python bench/amortized_scaling.py --device cuda [--size 224 --grid 14 --views 500,2000,8000]

Why: bench/amortized.py (CPU, 7 photos) showed that the explainer does not generalise from a few
hundred views. This script answers how many training views each design needs to reach Kernel SHAP
at 500 evaluations on held-out photos, so that the CPU training budget can be stated as arithmetic.

Training data: random crops (50-100 % of the area) and flips of bench/amortized.py's training
photos, each with ``--pairs`` Shapley-kernel coalitions and their complements (train.shapley_masks),
the model's logits of every coalition, the image and its fill, computed once for the largest view
count (smaller counts use a prefix). Designs, each trained for ``--steps`` Adam steps on FastSHAP's
loss over all classes:

* ``pixels``: amortized.ExplainerNet (what explain-cli train fits today): a small conv net on the
  image, its fill and coordinates, from scratch;
* ``features``: amortized.FeatureNet, a head on the model's own last feature map (the input of global pooling) of the
  image and of its fill, giving per patch a vector in the classifier's input space; a class's value
  is the classifier row times that vector. For a model that ends with global pooling and a linear
  layer this is exact in form: the logits are linear in the pooled features, so the Shapley values
  of every class are the classifier rows times the Shapley values of the pooled-feature game.

Reported: median and min Pearson r of the player values against Kernel SHAP with ``--reference``
evaluations over the same players and fill, on held-out photos (top-``--top-k`` classes), for each
design and view count, and for Kernel SHAP at ``--budget`` evaluations.
"""

from __future__ import annotations

import argparse
import math
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
sys.path.insert(0, str(REPO / "bench"))

from amortized import HELD_OUT, TRAIN_PHOTOS, photo, player_values  # noqa: E402
from explain_cli import masking  # noqa: E402
from explain_cli.config import load_config  # noqa: E402
from explain_cli.explainers import amortized, kernel  # noqa: E402
from explain_cli.explainers.base import ExplainContext  # noqa: E402
from explain_cli.images import load_image, load_preprocessed, normalise  # noqa: E402
from explain_cli.models import build_model  # noqa: E402
from explain_cli.train import _view, pearson_rows, shapley_masks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--views", default="500,2000,8000")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--designs", default="pixels,features")
    ap.add_argument("--reference", type=int, default=10_000)
    ap.add_argument("--budget", type=int, default=500)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--batch", type=int, default=512, help="model rows per call")
    ap.add_argument("--out", default=str(REPO / "bench" / "results-amortized-scaling.txt"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    try:
        demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        demo["model"]["layer"] = "input"
        demo["preprocess"]["size"] = args.size
        demo["input"] = {"dir": str(REPO / "sample_images")}
        (work / "cfg.yaml").write_text(yaml.safe_dump(demo))
        cfg = load_config(work / "cfg.yaml")
        model = build_model(cfg.model, lambda p: cfg.resolve(p)).eval().to(dev)
        for p in model.parameters():
            p.requires_grad_(False)
        mean, std = tuple(cfg.preprocess.mean), tuple(cfg.preprocess.std)
        fill = 128.0
        G, M, S = args.grid, args.grid ** 2, args.size
        labels = masking.grid_labels(S, S, G)
        lab = torch.from_numpy(labels.reshape(-1)).to(dev)
        feats: dict[str, torch.Tensor] = {}
        hook = model.bn2.register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
        W = model.classifier.weight.detach()

        def forward(rows: torch.Tensor, keep: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
            outs, kept = [], []
            for a in range(0, rows.shape[0], args.batch):
                outs.append(model(rows[a:a + args.batch]).float())
                if a < keep:
                    kept.append(feats["f"][:max(0, keep - a)].float())
            return torch.cat(outs), (torch.cat(kept) if keep else None)

        # -- held-out images and the references -----------------------------------------------------
        x_hold = torch.from_numpy(np.stack([load_preprocessed(photo(s), cfg.preprocess)[1] for s in HELD_OUT])).to(dev)
        n_hold = x_hold.shape[0]

        def context(settings) -> ExplainContext:
            return ExplainContext(model=model, layer=None, layer_name="input", background=x_hold[:0], mean=mean,
                                  std=std, device=dev, batch_size=args.batch, settings=settings)

        t = time.perf_counter()
        ref = kernel.Explainer(context(kernel.Settings(segments={"grid": G}, fill=fill, nsamples=args.reference))) \
            .explain(x_hold, args.top_k, list(range(n_hold)))
        ref_s = time.perf_counter() - t
        R = player_values(ref.values, labels)
        classes = torch.from_numpy(ref.classes).to(dev)
        t = time.perf_counter()
        k5 = kernel.Explainer(context(kernel.Settings(segments={"grid": G}, fill=fill, nsamples=args.budget))) \
            .explain(x_hold, args.top_k, [100 + i for i in range(n_hold)])
        k5_s = time.perf_counter() - t
        r_k = pearson_rows(player_values(k5.values, labels), R)
        hold_fill = masking.fill_images(x_hold, fill, mean, std)
        _, f_hold = forward(torch.cat([x_hold, hold_fill]), keep=2 * n_hold)
        fx_hold, ff_hold = f_hold[:n_hold], f_hold[n_hold:]
        out_hold, _ = forward(torch.cat([x_hold, hold_fill]))
        tot_hold = out_hold[:n_hold] - out_hold[n_hold:]

        say(f"# bench/amortized_scaling.py {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
            f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}")
        say(f"# demo model at {S} px, {G}x{G} players, fill {fill}; held out: {', '.join(HELD_OUT)}, top-{args.top_k} classes; "
            f"training photos: {len(TRAIN_PHOTOS)} (bench/amortized.py's), random crop/flip views, {args.pairs} coalition pairs each")
        say(f"# reference kernel@{args.reference}: {ref_s / n_hold:.2f} s/image; kernel@{args.budget}: {k5_s / n_hold:.3f} s/image")
        say(f"{'method':<22} {'views':>6} {'model evals':>12} {'train s':>8} {'median r':>9} {'min r':>7}")
        say(f"{'kernel@' + str(args.budget):<22} {'-':>6} {args.budget * n_hold:>12} {'-':>8} "
            f"{np.median(r_k):>9.3f} {r_k.min():>7.3f}")

        # -- training data, once for the largest view count ----------------------------------------
        counts = [int(v) for v in args.views.split(",")]
        n_views = max(counts)
        photos = []
        for s in TRAIN_PHOTOS:
            img = load_image(photo(s))
            short = min(img.size)
            if short > 2 * S:
                img = img.resize((round(img.width * 2 * S / short), round(img.height * 2 * S / short)))
            photos.append(img)
        rng = np.random.default_rng(0)
        X, FX, FF, VA, VN, VS, MS = [], [], [], [], [], [], []
        t = time.perf_counter()
        step = max(1, args.batch // (2 + 2 * args.pairs))
        for a in range(0, n_views, step):
            n = min(step, n_views - a)
            views = np.stack([_view(photos[int(rng.integers(len(photos)))], cfg.preprocess, rng) for _ in range(n)])
            x = torch.from_numpy(normalise(views, cfg.preprocess)).to(dev)
            fills = masking.fill_images(x, fill, mean, std)
            masks = shapley_masks(rng, n, args.pairs, M)
            shown = torch.from_numpy(masks).to(dev)
            rows = torch.cat([x, fills] + [masking.compose(shown[b], lab, x[b], fills[b]) for b in range(n)])
            out, f = forward(rows, keep=2 * n)
            X.append(x.half()); FX.append(f[:n].half()); FF.append(f[n:].half())
            VA.append(out[:n]); VN.append(out[n:2 * n]); VS.append(out[2 * n:].view(n, 2 * args.pairs, -1).half())
            MS.append(shown.half())
        X, FX, FF, VA, VN, VS, MS = (torch.cat(v) for v in (X, FX, FF, VA, VN, VS, MS))
        data_s = time.perf_counter() - t
        say(f"# training data: {n_views} views, {n_views * (2 + 2 * args.pairs)} model evaluations, {data_s:.1f} s")
        hook.remove()

        def r_of(phi: torch.Tensor) -> np.ndarray:
            picked = phi.gather(1, classes[:, :, None].expand(-1, -1, M)).double().cpu().numpy()
            return pearson_rows(picked, R)

        for design in args.designs.split(","):
            for count in counts:
                torch.manual_seed(0)
                if design == "pixels":
                    net = amortized.ExplainerNet(3, VA.shape[1], G, 64).to(dev)
                else:
                    net = amortized.FeatureNet(FX.shape[1], G, 256).to(dev)
                opt = torch.optim.Adam(net.parameters(), lr=1e-3)
                t = time.perf_counter()
                gen = torch.Generator(device="cpu").manual_seed(1)
                with torch.enable_grad():
                    for k in range(args.steps):
                        i = torch.randint(0, count, (32,), generator=gen).to(dev)
                        tot = VA[i] - VN[i]
                        if design == "pixels":
                            raw = net(X[i].float(), masking.fill_images(X[i].float(), fill, mean, std))
                        else:
                            raw = net(FX[i].float(), FF[i].float(), W)
                        phi = amortized.efficient(raw, tot)  # (B, C, M)
                        pred = torch.einsum("bsm,bcm->bsc", MS[i].float(), phi)
                        loss = (VS[i].float() - VN[i][:, None] - pred).square().mean()
                        for g_ in opt.param_groups:
                            g_["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * k / args.steps))
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                train_s = time.perf_counter() - t
                net.eval()
                raw = net(x_hold, hold_fill) if design == "pixels" else net(fx_hold, ff_hold, W)
                phi = amortized.efficient(raw, tot_hold)
                r = r_of(phi)
                say(f"{'amortized ' + design:<22} {count:>6} {count * (2 + 2 * args.pairs):>12} {train_s:>8.1f} "
                    f"{np.median(r):>9.3f} {r.min():>7.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if lines:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
