"""CPU cost of one overlay: explain-cli's renderer vs ``shap.image_plot`` + ``savefig``.

    python bench/overlay.py [--repeats 20] [--values pixel|layer] [--k 2]

The same figure in both arms: a 224 px photo (sample_images/chelsea.jpg, centre-cropped) and k
attribution maps in one shared colour scale, titled "name (0.xx)", written to a file as SVG and
as PNG (100 dpi). ``--values pixel`` gives (k, 3, 224, 224) attributions (a gradient at the
input), ``layer`` gives (k, 40, 28, 28) like the demo at blocks.3 (upsampled by both arms).

* shap - ``shap.image_plot(..., show=False)`` on the channel-summed maps, then
         ``plt.savefig`` and ``plt.close``: how the seed notebooks wrote their figures.
* ours - ``explain_cli.render.render_overlay``, as the pipeline calls it.

Timing is process CPU time (``time.process_time``: what a worker process spends, insensitive to
other processes waiting for the CPU), per overlay, median over the repeats; the arms run
interleaved (shap svg, ours svg, shap png, ours png, ...) after one untimed warm-up each, so a
busy machine slows both alike. The ratio is shap's time over ours.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli.render import channel_map, format_title, render_overlay  # noqa: E402


def inputs(values_kind: str, k: int, size: int = 224) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with Image.open(REPO / "sample_images" / "chelsea.jpg") as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        pixels = np.asarray(im.crop((left, top, left + side, top + side)).resize((size, size)))
    rng = np.random.default_rng(0)
    shape = (k, 3, size, size) if values_kind == "pixel" else (k, 40, size // 8, size // 8)
    values = rng.normal(scale=0.01, size=shape).astype(np.float32)
    names = ["tiger cat", "Egyptian cat", "tabby", "lynx", "Persian cat", "Siamese cat"]
    titles = [format_title(names[i % len(names)], 0.4 / (i + 1)) for i in range(k)]
    return pixels, values, titles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed overlays per arm and format")
    parser.add_argument("--values", choices=("pixel", "layer"), default="pixel")
    parser.add_argument("--k", type=int, default=2, help="classes per overlay")
    args = parser.parse_args()

    import warnings

    import matplotlib

    warnings.filterwarnings("ignore", category=PendingDeprecationWarning)  # shap's, on import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    pixels, values, titles = inputs(args.values, args.k)
    maps = channel_map(values, pixels.shape[:2])
    tmp = Path(tempfile.mkdtemp(prefix="overlay-bench-"))

    def shap_arm(fmt: str) -> None:
        shap.image_plot([maps[i][None, ..., None] for i in range(args.k)], pixels[None] / 255.0,
                        np.array([titles]), show=False)
        plt.savefig(tmp / f"shap.{fmt}", format=fmt, dpi=100)
        plt.close("all")

    def ours_arm(fmt: str) -> None:
        render_overlay(pixels, values, titles, tmp / f"ours.{fmt}", fmt=fmt, dpi=100)

    arms = {("shap", "svg"): lambda: shap_arm("svg"), ("ours", "svg"): lambda: ours_arm("svg"),
            ("shap", "png"): lambda: shap_arm("png"), ("ours", "png"): lambda: ours_arm("png")}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in arms}
    for fn in arms.values():  # warm-up: imports, font and colour-map caches
        fn()
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for key, fn in arms.items():
            t0 = time.process_time()
            fn()
            times[key].append(time.process_time() - t0)
    load_after = os.getloadavg()[0]

    print(f"overlay: {pixels.shape[1]} px, k={args.k}, values {args.values} {values.shape[1:]}, "
          f"{args.repeats} repeats per arm, interleaved; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {load_after:.1f}")
    print(f"{'arm':<6} {'format':<6} {'ms CPU/overlay':>15} {'min ms':>8} {'KB':>7} {'x vs shap':>10}")
    for fmt in ("svg", "png"):
        shap_ms = statistics.median(times["shap", fmt]) * 1000
        for arm in ("shap", "ours"):
            ms = statistics.median(times[arm, fmt]) * 1000
            kb = (tmp / f"{arm}.{fmt}").stat().st_size / 1024
            ratio = f"{shap_ms / ms:10.1f}" if arm == "ours" else f"{'-':>10}"
            print(f"{arm:<6} {fmt:<6} {ms:15.1f} {min(times[arm, fmt]) * 1000:8.1f} {kb:7.0f} {ratio}")
    for path in tmp.iterdir():
        path.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
