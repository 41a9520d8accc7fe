"""A known-truth benchmark: does a map point at what decides the class?

    PYTHONPATH=. python bench/truth.py [--eval 200 --train 3000 --epochs 5] [--out bench/results-truth.txt]

The data is made by code (offline, seeded), in the spirit of BAM (Yang & Kim 2019) and FunnyBirds
(Hesse et al., ICCV 2023): 32 x 32 images of smooth colour noise with three distractor bars
(random colours, sizes and places), and one planted 8 x 8 object at a random place whose *shape*
(plus, X, ring, disk; random colour) is the class. Nothing else in the image carries the class, so
a map that explains the model's decision should put its positive attribution on the object; its
8 x 8 box is the mask (6.25 % of the image).

A small CNN (4 convolutions with batch norm, global max pooling, a linear layer) is trained on the CPU and its
held-out accuracy reported. Each explainer explains each held-out image's true class; per row:

- ``in-mask``: the share of the map's positive attribution (summed over channels; a layer map
  upsampled bilinearly to 32 x 32) that lies inside the mask, mean over images;
- ``pointing``: the share of images whose map's maximum lies inside the mask (Zhang et al.'s
  pointing game);
- ``deletion`` / ``insertion``: AUC of the class's softmax probability as the pixels are deleted
  (set to the data mean, 0 after normalisation) or inserted into the mean image in the map's order,
  16 steps (the RISE definitions; lower deletion and higher insertion are better);
- ``s / image``: wall time of the explanation per image on this machine, with its load average.

Rows: gradient at the input and at a layer, deep, partition@500, kernel@500 and @2000 (8 x 8
patches, mean fill), and amortized (``explain-cli train`` on 1,000 of the training images, 3 epochs,
the same players and fill as kernel; never trained on the held-out images, which are drawn from
another seed). Baselines that know nothing: a centred Gaussian blob (the same map for every
image), gradient at the input of the *untrained* network (same architecture, its initial weights)
and the amortized network untrained; a uniformly random map would put 6.25 % in the mask and point
in 6.25 % of images.

A second section does the same for a small ViT (``ViT``: a convolutional stem making 8 x 8 tokens,
3 pre-norm transformer blocks of width 64, a class token; trained on 6,000 images for 12 epochs with
AdamW): gradient at the input, deep, partition@500, kernel@500 and @2000, the untrained ViT's
gradient and the blob. A plain patchify ViT (4 x 4 patches, no convolutions) reached only 71 %
held-out accuracy after 40 epochs on 6,000 images on this CPU, too far from the 95 % a model must
reach before its maps can be scored against the mask; the convolutional stem (Xiao et al. 2021,
"Early convolutions help transformers see better") is what makes a ViT trainable here in minutes.
``--models cnn`` or ``--models vit`` runs one section. The CNN section takes 2.5 minutes of an idle
2-core CPU (13 under load 4-5; kernel@2000 a quarter of it: ``--skip kernel@2000``), the ViT section
about as much again plus its training.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli.explainers import gradient, kernel, partition  # noqa: E402
from explain_cli.explainers.base import ExplainContext  # noqa: E402
from explain_cli.explainers.deep import explainer as deep  # noqa: E402
from explain_cli.targets import LABEL, TargetSpec  # noqa: E402

SIZE, OBJ, CLASSES = 32, 8, ("plus", "x", "ring", "disk")
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def shapes() -> np.ndarray:
    """(4, OBJ, OBJ) bool: the class objects."""
    i, j = np.mgrid[0:OBJ, 0:OBJ]
    c = (OBJ - 1) / 2
    plus = (np.abs(i - c) < 1.2) | (np.abs(j - c) < 1.2)
    cross = (np.abs(i - j) < 1.2) | (np.abs(i + j - (OBJ - 1)) < 1.2)
    ring = (np.maximum(np.abs(i - c), np.abs(j - c)) > c - 2)
    disk = (i - c) ** 2 + (j - c) ** 2 <= (c + 0.3) ** 2
    return np.stack([plus, cross, ring, disk])


def make_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 3, SIZE, SIZE) float32 normalised images, (n,) classes, (n, SIZE, SIZE) bool masks."""
    rng = np.random.default_rng(seed)
    objects = shapes()
    low = torch.from_numpy(rng.uniform(0.2, 0.8, (n, 3, 4, 4)).astype(np.float32))
    img = nn.functional.interpolate(low, size=SIZE, mode="bicubic", align_corners=True).numpy()
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    classes = rng.integers(0, len(CLASSES), n)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for k in range(n):
        for _ in range(3):  # distractor bars: 2-3 px by 6-12 px, either orientation
            h, w = rng.integers(2, 4), rng.integers(6, 13)
            if rng.random() < 0.5:
                h, w = w, h
            y, x = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
            img[k, :, y:y + h, x:x + w] = rng.uniform(0, 1, (3, 1, 1))
        y, x = rng.integers(0, SIZE - OBJ + 1, 2)
        colour = rng.uniform(0, 1, 3)
        colour[rng.integers(0, 3)] = rng.choice([0.0, 1.0])  # a saturated channel: visible on any background
        shape = objects[classes[k]]
        patch = img[k, :, y:y + OBJ, x:x + OBJ]
        patch[:, shape] = colour[:, None]
        masks[k, y:y + OBJ, x:x + OBJ] = True
    img = np.round(np.clip(img, 0, 1) * 255) / 255  # 8-bit, so the PNGs amortized trains on are these images
    norm = (img - np.array(MEAN, dtype=np.float32)[:, None, None]) / np.array(STD, dtype=np.float32)[:, None, None]
    return norm.astype(np.float32), classes, masks


def make_cnn(num_classes: int = len(CLASSES)) -> nn.Module:
    """4 convolutions with batch norm, global max pooling, a linear layer: 98.8 % held-out accuracy
    after 6 epochs on 3,000 images in 10 s (without batch norm and with average pooling it stayed
    at chance for 2 epochs)."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))


class Block(nn.Module):
    """A pre-norm transformer block: multi-head self-attention (``scaled_dot_product_attention``) and a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, mlp * dim), nn.Linear(mlp * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer: a convolutional stem (two 3 x 3 convolutions, stride 2 each, as
    in Xiao et al. 2021, "Early convolutions help transformers see better") makes 8 x 8 tokens of
    width ``dim`` from the 32 x 32 image; a class token, learned position embeddings, ``depth``
    pre-norm blocks, the class token's LayerNorm and a linear head. ``stem="patch"`` is the plain
    ViT patchify stem (4 x 4 patches, one strided convolution)."""

    def __init__(self, num_classes: int = len(CLASSES), dim: int = 64, depth: int = 3, heads: int = 4,
                 stem: str = "conv"):
        super().__init__()
        if stem == "conv":
            self.embed = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                       nn.Conv2d(32, dim, 3, 2, 1))
        else:
            self.embed = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, (SIZE // 4) ** 2 + 1, dim) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


def make_vit(num_classes: int = len(CLASSES)) -> nn.Module:
    """The ViT row's model (``ViT``, convolutional stem, width 64, 3 blocks of 4 heads: 124,000 parameters)."""
    return ViT(num_classes)


def train_model(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, vit: bool = False) -> float:
    """Adam (lr 3e-3) with a cosine schedule, batches of 64; ``vit``: AdamW (lr 2e-3, weight decay
    0.05) with one epoch of linear warm-up before the cosine. Returns seconds."""
    t0 = time.monotonic()
    torch.manual_seed(seed)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    per_epoch = (len(xs) + 63) // 64
    steps = epochs * per_epoch
    if vit:
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / per_epoch) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {epoch + 1}/{epochs}: loss {float(loss.detach()):.3f}", flush=True)
    model.eval()
    return time.monotonic() - t0


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def to_map(values: np.ndarray) -> np.ndarray:
    """(N, H, W) maps at the input resolution from an explainer's (N, k, C, h, w) values (class slot 0)."""
    m = torch.from_numpy(np.asarray(values, dtype=np.float32)[:, 0].sum(1))
    if m.shape[-1] != SIZE:
        m = nn.functional.interpolate(m[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    return m.numpy()


def scores(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """Mean share of positive attribution in the mask, and the pointing-game hit rate."""
    pos = np.clip(maps, 0, None).reshape(len(maps), -1)
    inside = (pos * masks.reshape(len(masks), -1)).sum(1)
    total = pos.sum(1)
    share = np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)
    hits = masks.reshape(len(masks), -1)[np.arange(len(maps)), maps.reshape(len(maps), -1).argmax(1)]
    return float(share.mean()), float(hits.mean())


def curves(model: nn.Module, x: np.ndarray, y: np.ndarray, maps: np.ndarray, steps: int = 16) -> tuple[float, float]:
    """Mean deletion and insertion AUCs (softmax probability of the class, x from 0 to 1)."""
    n = len(x)
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    fractions = np.linspace(0, 1, steps + 1)
    xt = torch.from_numpy(x)
    dele, ins = np.zeros((n, steps + 1)), np.zeros((n, steps + 1))
    with torch.no_grad():
        for s, f in enumerate(fractions):
            top = np.zeros((n, SIZE * SIZE), dtype=bool)
            top[np.arange(n)[:, None], order[:, :int(round(f * SIZE * SIZE))]] = True
            keep = torch.from_numpy(top.reshape(n, 1, SIZE, SIZE))
            for arr, rows in ((dele, torch.where(keep, torch.zeros(()), xt)), (ins, torch.where(keep, xt, torch.zeros(())))):
                p = torch.softmax(model(rows), 1)[torch.arange(n), torch.from_numpy(y)]
                arr[:, s] = p.numpy()
    return float(np.trapezoid(dele, fractions, axis=1).mean()), float(np.trapezoid(ins, fractions, axis=1).mean())


def explain(explainer_cls, settings, model: nn.Module, layer, layer_name: str, background: torch.Tensor,
            x: np.ndarray, y: np.ndarray, chunk: int = 25,
            stabilities: list[float] | None = None) -> tuple[np.ndarray, float]:
    """(N, SIZE, SIZE) maps of each image's true class, and seconds per image; each map's split-half
    stability (where the explainer gives one) is appended to ``stabilities``."""
    ctx = ExplainContext(model=model, layer=layer, layer_name=layer_name, background=background, mean=MEAN, std=STD,
                         device=torch.device("cpu"), batch_size=512, settings=settings)
    expl = explainer_cls(ctx)
    spec = TargetSpec(entries=(LABEL,), names=CLASSES)
    out, t0 = [], time.monotonic()
    for a in range(0, len(x), chunk):
        xb, yb = torch.from_numpy(x[a:a + chunk]), y[a:a + chunk]
        att = expl.explain(xb, spec.for_batch([(int(c),) for c in yb]), list(range(a, a + len(yb))))
        out.append(to_map(att.values))
        if stabilities is not None and att.stability is not None:
            stabilities.extend(float(v) for v in np.asarray(att.stability)[:, 0] if np.isfinite(v))
    return np.concatenate(out), (time.monotonic() - t0) / len(x)


def average_hash(x: np.ndarray) -> np.ndarray:
    """(N, 64) bool perceptual (average) hashes: grey, 8 x 8 box means, above their mean."""
    grey = torch.from_numpy(x.mean(1, keepdims=True))
    small = nn.functional.adaptive_avg_pool2d(grey, 8).reshape(len(x), -1).numpy()
    return small > small.mean(1, keepdims=True)


def near_duplicates(train_x: np.ndarray, held_x: np.ndarray, bits: int = 4) -> int:
    """Held-out images whose average hash is within ``bits`` of a training image's (near-duplicates)."""
    a, b = average_hash(train_x), average_hash(held_x)
    count = 0
    for h in b:
        if int((a != h).sum(1).min()) <= bits:
            count += 1
    return count


def train_amortized(cnn: nn.Module, x: np.ndarray, work: Path, images: int, epochs: int) -> tuple[Path, float]:
    """``explain-cli train`` (pixels network: the CNN pools by max) on the first ``images`` training
    images, written as PNGs; 8 x 8 patches, mean fill as the kernel rows. Returns (explainer.pt, seconds)."""
    import yaml
    from PIL import Image

    from explain_cli.config import load_config
    from explain_cli.train import train

    (work / "train").mkdir(parents=True, exist_ok=True)
    pixels = np.round((x[:images] * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]) * 255)
    for i, p in enumerate(np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)):
        Image.fromarray(p).save(work / "train" / f"{i:05d}.png")
    torch.save(cnn.state_dict(), work / "cnn.pt")
    (work / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    config = {"model": {"arch": "python:bench.truth:make_cnn", "num_classes": len(CLASSES), "checkpoint": "cnn.pt",
                        "layer": "input"},
              "labels": "labels.txt", "preprocess": {"size": SIZE, "resize": "stretch", "mean": list(MEAN), "std": list(STD)},
              "input": {"dir": "train"},
              "explainer": {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": 8}, "fill": "mean",
                            "train": {"epochs": epochs, "pairs": 16, "images_per_step": 32, "width": 32,
                                      "augment": False, "holdout": 0.05, "validate_nsamples": 0}},
              "device": "cpu", "batch_size": 1024, "workers": 0}
    (work / "amortized.yaml").write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    train(load_config(work / "amortized.yaml"), work / "explainer.pt")
    return work / "explainer.pt", time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=3000, help="training images of the CNN")
    ap.add_argument("--eval", type=int, default=200, help="held-out images explained")
    ap.add_argument("--epochs", type=int, default=5, help="epochs of the CNN")
    ap.add_argument("--models", default="cnn,vit", help="comma-separated: cnn, vit")
    ap.add_argument("--vit-train", type=int, default=6000, help="training images of the ViT")
    ap.add_argument("--vit-epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--amortized-images", type=int, default=1000, help="training images of the amortized explainer (0: no row)")
    ap.add_argument("--amortized-epochs", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated row names to leave out (e.g. kernel@2000)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results-truth.txt")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    started = time.monotonic()
    load_before = os.getloadavg()
    lines: list[str] = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    x_te, y_te, m_te = make_data(1000, seed=args.seed + 10_000)
    x_ev, y_ev, m_ev = x_te[:args.eval], y_te[:args.eval], m_te[:args.eval]
    say(f"# bench/truth.py, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}")
    say(f"# data: {SIZE} x {SIZE} px, {len(CLASSES)} classes ({', '.join(CLASSES)}) decided by an {OBJ} x {OBJ} object at a "
        f"random place, 3 distractor bars; mask = the object's box ({100 * OBJ * OBJ / SIZE / SIZE:.2f} % of the image)")
    say(f"# {args.eval} held-out images, each explained for its true class; deletion/insertion: {16} steps to the mean image")
    grid = {"grid": 8}

    def trained_pair(kind: str, n: int, epochs: int) -> tuple[nn.Module, nn.Module, np.ndarray]:
        """(trained, untrained with the trained one's initial weights, training images); says the accuracy."""
        x_tr, y_tr, _ = make_data(n, seed=args.seed)
        torch.manual_seed(args.seed)
        make = make_cnn if kind == "cnn" else make_vit
        untrained = make().eval()
        model = make()
        model.load_state_dict(untrained.state_dict())
        print(f"training the {kind.upper()} on {n} images, {epochs} epochs", flush=True)
        seconds = train_model(model, x_tr, y_tr, epochs, args.seed, vit=kind == "vit")
        for p in list(model.parameters()) + list(untrained.parameters()):
            p.requires_grad_(False)
        params = sum(p.numel() for p in model.parameters())
        say("")
        say(f"## {kind.upper()}: {model.__class__.__name__ if kind == 'vit' else 'Sequential'}, {params} parameters, "
            f"trained on {n} images, {epochs} epochs, {seconds:.0f} s; held-out accuracy "
            f"{100 * accuracy(model, x_te, y_te):.1f} % (1000 images); untrained: {100 * accuracy(untrained, x_te, y_te):.1f} %")
        return model, untrained, x_tr

    def table(model: nn.Module, rows: list, background: torch.Tensor, extra=None) -> None:
        say("")
        say("| map | in-mask share of positive attribution | pointing game | deletion AUC (lower better) "
            "| insertion AUC (higher better) | s / image |")
        say("| --- | ---: | ---: | ---: | ---: | ---: |")
        reliability: list[str] = []
        for name, cls, settings, explained, layer, layer_name in rows:
            if any(s in name for s in skip):
                continue
            stab: list[float] = []
            maps, per_image = explain(cls, settings, explained, layer, layer_name, background, x_ev, y_ev,
                                      stabilities=stab)
            if stab:
                reliability.append(f"{name.split(',')[0]} {np.median(stab):.3f}")
            share, point = scores(maps, m_ev)
            dele, ins = curves(model, x_ev, y_ev, maps)
            say(f"| {name} | {share:.3f} | {point:.3f} | {dele:.3f} | {ins:.3f} | {per_image:.4f} |")
        if extra is not None:
            extra()
        i, j = np.mgrid[0:SIZE, 0:SIZE]
        blob = np.exp(-((i - (SIZE - 1) / 2) ** 2 + (j - (SIZE - 1) / 2) ** 2) / (2 * (SIZE / 6) ** 2))
        maps = np.broadcast_to(blob, (len(x_ev), SIZE, SIZE)).copy()
        share, point = scores(maps, m_ev)
        dele, ins = curves(model, x_ev, y_ev, maps)
        say(f"| baseline: centred Gaussian blob (sigma {SIZE / 6:.1f} px), the same map for every image | {share:.3f} | "
            f"{point:.3f} | {dele:.3f} | {ins:.3f} | 0 |")
        say(f"| (a uniformly random map, expected) | {OBJ * OBJ / SIZE / SIZE:.3f} | {OBJ * OBJ / SIZE / SIZE:.3f} | | | |")
        say("")
        if reliability:
            say("# median split-half stability of the maps (their estimated correlation with a rerun; kernel: "
                "from the variance of its values): " + "; ".join(reliability))

    if "cnn" in models:
        cnn, untrained, x_tr = trained_pair("cnn", args.train, args.epochs)
        background = torch.from_numpy(x_tr[:16])
        rows = [
            ("gradient at the input, nsamples 32", gradient.Explainer, gradient.Settings(nsamples=32), cnn, None, "input"),
            ("gradient at layer 9 (the last conv's 8 x 8 input), nsamples 32", gradient.Explainer,
             gradient.Settings(nsamples=32), cnn, cnn[9], "9"),
            ("deep at the input, 16 background images", deep.Explainer, deep.Settings(), cnn, None, "input"),
            ("partition, max_evals 500", partition.Explainer, partition.Settings(max_evals=500), cnn, None, "input"),
            ("kernel@500, 8 x 8 patches, mean fill", kernel.Explainer,
             kernel.Settings(segments=grid, fill="mean", nsamples=500), cnn, None, "input"),
            ("kernel@2000, 8 x 8 patches, mean fill", kernel.Explainer,
             kernel.Settings(segments=grid, fill="mean", nsamples=2000), cnn, None, "input"),
            ("baseline: gradient at the input of the untrained CNN", gradient.Explainer, gradient.Settings(nsamples=32),
             untrained, None, "input"),
        ]

        def amortized_rows() -> None:
            if args.amortized_images <= 0 or "amortized" in skip:
                return
            import tempfile

            from explain_cli.explainers import amortized

            dupes = near_duplicates(x_tr[:args.amortized_images], x_ev)
            say(f"# amortized split: {dupes} of {len(x_ev)} held-out images within 4 bits of a training image's 64-bit "
                f"average hash (near-duplicates)")
            with tempfile.TemporaryDirectory() as tmp:
                print("training the amortized explainer", flush=True)
                path, train_s = train_amortized(cnn, x_tr, Path(tmp), args.amortized_images, args.amortized_epochs)
                # its untrained prior: the same checkpoint with the network's initial weights (the values
                # still sum to v(all) - v(none) by the efficiency normalisation)
                data = torch.load(path, weights_only=True)
                torch.manual_seed(args.seed)
                data["state_dict"] = amortized.build_net(data).state_dict()
                torch.save(data, Path(tmp) / "untrained.pt")
                checkpoints = [
                    (f"amortized, pixels network, 8 x 8 patches, mean fill ({args.amortized_images} training images x "
                     f"{args.amortized_epochs} epochs, {train_s:.0f} s of training)", path),
                    ("baseline: amortized, the same network untrained (initial weights)", Path(tmp) / "untrained.pt")]
                for name, checkpoint in checkpoints:
                    maps, per_image = explain(amortized.Explainer, amortized.Settings(checkpoint=str(checkpoint)), cnn,
                                              None, "input", background[:0], x_ev, y_ev)
                    share, point = scores(maps, m_ev)
                    dele, ins = curves(cnn, x_ev, y_ev, maps)
                    say(f"| {name} | {share:.3f} | {point:.3f} | {dele:.3f} | {ins:.3f} | {per_image:.4f} |")

        table(cnn, rows, background, amortized_rows)
    if "vit" in models:
        vit, untrained, x_tr = trained_pair("vit", args.vit_train, args.vit_epochs)
        background = torch.from_numpy(x_tr[:16])
        rows = [
            ("ViT: gradient at the input, nsamples 32", gradient.Explainer, gradient.Settings(nsamples=32), vit, None,
             "input"),
            ("ViT: deep at the input, 16 background images", deep.Explainer, deep.Settings(), vit, None, "input"),
            ("ViT: partition, max_evals 500", partition.Explainer, partition.Settings(max_evals=500), vit, None, "input"),
            ("ViT: kernel@500, 8 x 8 patches, mean fill", kernel.Explainer,
             kernel.Settings(segments=grid, fill="mean", nsamples=500), vit, None, "input"),
            ("ViT: kernel@2000, 8 x 8 patches, mean fill", kernel.Explainer,
             kernel.Settings(segments=grid, fill="mean", nsamples=2000), vit, None, "input"),
            ("ViT baseline: gradient at the input of the untrained ViT", gradient.Explainer,
             gradient.Settings(nsamples=32), untrained, None, "input"),
        ]
        table(vit, rows, background)
    say(f"# total {time.monotonic() - started:.0f} s; load average before {load_before[0]:.1f}, after "
        f"{os.getloadavg()[0]:.1f} (1 min; the CPU is shared)")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
