"""The hand-written PNG encoder (explain_cli/render.py ``_png``) against Pillow's, on a real run's images.

    PYTHONPATH=. python bench/png.py [--repeats 20] [--runs 1] [--fast-runs 2] [--out bench/results-png.txt]

1. Runs the demo (``explain-cli run configs/demo.yaml``) once with ``output.format=png`` and once with
   the default ``svg``, each with every encoder call recorded: the PNG overlays' canvases and the SVG
   overlays' embedded panels (what ``_png`` encodes in a real run), and the time spent encoding.
2. Encodes each of those images with ``_png`` (every row filtered "up", zlib level 1, Z_RLE) and with
   Pillow at the same settings (``compress_level=1, compress_type=Z_RLE``; Pillow picks each row's
   filter itself) and at its defaults (level 6): process CPU time per image (median over the repeats,
   the arms interleaved), file size, and the decoded pixels compared (must be identical).
3. The whole demo run's wall and CPU time (``explain-cli run configs/demo.yaml --set output.format=png``
   in a fresh process, ``--runs`` times per arm, interleaved) with ``_png`` and with Pillow's encoder
   swapped in, and the share of the run spent encoding.
4. The same on bench/e2e.py's pipeline-bound job (a negligible model: what the CPU does on a GPU run).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli import render  # noqa: E402


def pillow_png(rgb: np.ndarray, dpi: int | None = None, level: int = 1, strategy: int = zlib.Z_RLE) -> bytes:
    """What ``render._png`` would be with Pillow: the same pixels, the dpi in pHYs."""
    buf = io.BytesIO()
    options = {"compress_level": level, "compress_type": strategy}
    if dpi:
        options["dpi"] = (dpi, dpi)
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", **options)
    return buf.getvalue()


# A run in a child process: the encoder chosen by EXPLAIN_BENCH_PNG (ours | pillow), every call's input
# shape and seconds recorded to EXPLAIN_BENCH_LOG (and the arrays to EXPLAIN_BENCH_KEEP when set).
CHILD = r'''
import json, os, sys, time
import numpy as np
sys.path.insert(0, os.environ["EXPLAIN_BENCH_REPO"])
sys.path.insert(0, os.path.join(os.environ["EXPLAIN_BENCH_REPO"], "bench"))
from explain_cli import render
from png import pillow_png
encode = render._png if os.environ["EXPLAIN_BENCH_PNG"] == "ours" else pillow_png
calls, keep = [], os.environ.get("EXPLAIN_BENCH_KEEP")
def timed(rgb, dpi=None):
    t = time.perf_counter()
    data = encode(rgb, dpi)
    calls.append([list(rgb.shape), time.perf_counter() - t, len(data)])
    if keep:
        np.save(os.path.join(keep, f"{len(calls):04d}.npy"), np.asarray(rgb))
    return data
render._png = timed
import atexit
import resource
atexit.register(lambda: open(os.environ["EXPLAIN_BENCH_LOG"], "w").write(json.dumps(
    {"calls": calls, "rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})))
from explain_cli.cli import main
sys.argv = ["explain-cli"] + sys.argv[1:]
main()
'''


def demo_run(arm: str, fmt: str, out: Path, keep: Path | None = None, config: Path = REPO / "configs" / "demo.yaml",
             extra: tuple[str, ...] = ()) -> dict:
    """One run of ``config`` (the demo) in a fresh process; wall, CPU, peak RSS and the encoder calls."""
    log = out.with_suffix(".calls.json")
    env = {**os.environ, "EXPLAIN_BENCH_REPO": str(REPO), "EXPLAIN_BENCH_PNG": arm, "EXPLAIN_BENCH_LOG": str(log),
           "EXPLAIN_BENCH_KEEP": str(keep or ""), "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(config.parent), os.environ.get("PYTHONPATH", "")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, "run", str(config), "--no-progress",
                           "--overwrite", "--set", f"output.dir={out}", "--set", f"output.format={fmt}", *extra],
                          env=env, capture_output=True, text=True, cwd=config.parent)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"demo run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    record = json.loads(log.read_text())
    calls = record["calls"]
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "rss_mb": record["rss_kb"] / 1024, "calls": len(calls), "encode_s": sum(c[1] for c in calls),
            "bytes": sum(c[2] for c in calls)}


def cpu_ms(fn, arrays: list[np.ndarray]) -> float:
    t = time.process_time()
    for a in arrays:
        fn(a)
    return (time.process_time() - t) * 1000 / len(arrays)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def fast_job(tmp: Path, runs: int, lines: list[str], images: int = 200) -> None:
    """4. The same on bench/e2e.py's pipeline-bound job (a negligible one-conv model, gradient at the input,
    nsamples 2, 224 px, top-2; 300 px JPEGs): what a run looks like to the CPU when the model is cheap or
    on a GPU, so rendering and encoding are a large part of it. ``--workers 0``: every encoder call in
    the one process (CPU time is comparable either way)."""
    sys.path.insert(0, str(REPO / "bench"))
    import e2e

    root = tmp / "fast"
    root.mkdir()
    e2e.make_images(root / "images", images)
    lines.append(f"4. bench/e2e.py's conv job (pipeline-bound), {images} images, --workers 0, {runs} run(s) per "
                 "encoder and format interleaved; CPU ms per image is the whole process's CPU over the images")
    lines.append(f"{'format':<8}{'encoder':<10}{'wall s':>9}{'CPU s':>9}{'CPU ms/image':>14}{'encode ms/image':>17}"
                 f"{'encode % of CPU':>17}")
    for fmt in ("png", "svg"):
        config = e2e.write_config(root, "conv", "gradient-nsamples2", fmt, [])
        results: dict[str, list[dict]] = {"ours": [], "pillow": []}
        for i in range(runs):
            for arm in results:
                results[arm].append(demo_run(arm, fmt, tmp / f"fast-{fmt}-{arm}-{i}", config=config,
                                             extra=("--set", f"input.dir={root / 'images'}", "--workers", "0")))
        for arm, rs in results.items():
            for r in rs:
                lines.append(f"{fmt:<8}{arm:<10}{r['wall']:>9.1f}{r['cpu']:>9.1f}{1000 * r['cpu'] / images:>14.1f}"
                             f"{1000 * r['encode_s'] / images:>17.2f}{100 * r['encode_s'] / r['cpu']:>16.1f}%")
        ours = statistics.median(r["encode_s"] for r in results["ours"])
        pil = statistics.median(r["encode_s"] for r in results["pillow"])
        cpu = statistics.median(r["cpu"] for r in results["ours"])
        lines.append(f"{fmt}: saving of _png over Pillow (level 1, RLE): {1000 * (pil - ours) / images:+.2f} ms per "
                     f"image = {100 * (pil - ours) / cpu:+.1f}% of the process's CPU time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes over the images per encoder")
    parser.add_argument("--runs", type=int, default=1, help="whole demo runs per encoder")
    parser.add_argument("--fast-runs", type=int, default=2, help="runs of the pipeline-bound job per encoder and format")
    parser.add_argument("--fast-images", type=int, default=200, help="images of the pipeline-bound job")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    lines = [f"# PYTHONPATH=. python bench/png.py --repeats {args.repeats} --runs {args.runs} --fast-runs "
             f"{args.fast_runs} --fast-images {args.fast_images}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.machine()}, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.1f}; Pillow {Image.__version__}, zlib {zlib.ZLIB_VERSION}"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = {}
        for fmt in ("png", "svg"):
            keep = tmp / f"keep-{fmt}"
            keep.mkdir()
            demo_run("ours", fmt, tmp / f"demo-{fmt}", keep)
            sets[fmt] = [np.load(p) for p in sorted(keep.glob("*.npy"))]
        lines.append("1-2. each image a real demo run encoded: PNG overlays (whole canvas, 100 dpi) and SVG overlays' "
                     "panels; ms CPU per image (median of the repeats), KB per image, pixels after decoding")
        lines.append(f"{'images':<28}{'encoder':<34}{'ms/image':>10}{'KB/image':>10}  pixels")
        arms = {"render._png (up filter, level 1, RLE)": render._png,
                "Pillow level 1, Z_RLE": pillow_png,
                "Pillow defaults (level 6)": lambda a, dpi=None: pillow_png(a, dpi, 6, zlib.Z_DEFAULT_STRATEGY)}
        for fmt, arrays in sets.items():
            what = f"{len(arrays)} {'overlays ' + 'x'.join(map(str, arrays[0].shape[:2])) if fmt == 'png' else 'SVG panels'}"
            times: dict[str, list[float]] = {name: [] for name in arms}
            for _ in range(args.repeats):
                for name, fn in arms.items():
                    times[name].append(cpu_ms(fn, arrays))
            for name, fn in arms.items():
                data = [fn(a) for a in arrays]
                same = all(np.array_equal(decoded(d), a) for d, a in zip(data, arrays))
                lines.append(f"{what:<28}{name:<34}{statistics.median(times[name]):>10.2f}"
                             f"{sum(map(len, data)) / len(data) / 1024:>10.1f}  {'identical' if same else 'DIFFER'}")
        lines.append(f"3. whole demo run, output.format=png, fresh process each, {args.runs} per encoder interleaved "
                     "(wall and CPU of the process; encode: the seconds inside the encoder)")
        lines.append(f"{'encoder':<12}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}{'calls':>7}{'encode s':>10}"
                     f"{'encode % of wall':>18}")
        results: dict[str, list[dict]] = {"ours": [], "pillow": []}
        for i in range(args.runs):
            for arm in results:
                results[arm].append(demo_run(arm, "png", tmp / f"run-{arm}-{i}"))
        for arm, runs in results.items():
            for r in runs:
                lines.append(f"{arm:<12}{r['wall']:>9.1f}{r['cpu']:>9.1f}{r['rss_mb']:>13.0f}{r['calls']:>7}"
                             f"{r['encode_s']:>10.3f}{100 * r['encode_s'] / r['wall']:>17.2f}%")
        ours = statistics.median(r["encode_s"] for r in results["ours"])
        pil = statistics.median(r["encode_s"] for r in results["pillow"])
        wall = statistics.median(r["wall"] for r in results["ours"])
        lines.append(f"saving of _png over Pillow (level 1, RLE) on the whole run: {pil - ours:+.3f} s of "
                     f"{wall:.1f} s wall = {100 * (pil - ours) / wall:+.2f}%")
        fast_job(tmp, args.fast_runs, lines, args.fast_images)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
