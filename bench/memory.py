"""Streaming check: peak RSS of `explain-cli run` for 20 and 200 images, and CLI start-up time.

    python bench/memory.py            # 20 vs 200 images, demo model, nsamples 8
    python bench/memory.py --counts 20 100 --nsamples 4

Each run is a separate process (peak RSS from wait4's ru_maxrss), on copies of sample_images
mirrored and shifted so no two are identical. The target: the peak for the largest count within
10% of the smallest, i.e. memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_folder(root: Path, count: int) -> None:
    sources = sorted((REPO / "sample_images").rglob("*.jpg"))
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sources]
    for i in range(count):
        arr = photos[i % len(photos)]
        arr = np.roll(arr, shift=i, axis=1)
        if (i // len(photos)) % 2:
            arr = arr[:, ::-1]
        Image.fromarray(np.ascontiguousarray(arr)).save(root / f"img{i:04d}.jpg", quality=90)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float, int]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} exited {code}: {proc.stderr.read()[-2000:]}")
    return usage.ru_maxrss / 1024, seconds, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    parser.add_argument("--counts", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--nsamples", type=int, default=8)
    args = parser.parse_args()

    exe = [sys.executable, "-m", "explain_cli"]
    for flag in ("--help", "--version"):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(exe + [flag], check=True, stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        print(f"explain-cli {flag}: {min(times):.2f} s (best of 3)")

    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            folder = Path(tmp) / f"in{count}"
            folder.mkdir()
            make_folder(folder, count)
            rss, seconds, _ = peak_rss_mb(exe + ["run", args.config, "--input", str(folder),
                                                 "--output", str(Path(tmp) / f"out{count}"), "--no-progress",
                                                 "--set", f"explainer.nsamples={args.nsamples}",
                                                 "--set", "background.from_input=4", "--device", "cpu"])
            peaks[count] = rss
            print(f"{count:5d} images: peak RSS {rss:7.0f} MB, {seconds:6.1f} s")
    low, high = peaks[min(peaks)], peaks[max(peaks)]
    print(f"peak RSS ratio {max(peaks)} vs {min(peaks)} images: {high / low:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
