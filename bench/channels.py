"""Does a 1-channel model cost more than a 3-channel one? (issue 28: it must not.)

One run, same machine, same images (gray content, saved as 8-bit gray PNGs for the 1-channel run and
as RGB PNGs for the 3-channel one), a ResNet-18 (random weights) whose first convolution takes 1 or
3 channels:
  * decode + preprocess alone (images.load_preprocessed), per image;
  * the whole process, ``explain-cli run`` (decode, explain with gradient nsamples 16, overlay, CSV),
    wall / user / sys seconds and peak RSS from /usr/bin/time -v.

    python bench/channels.py [--images 16] [--size 224]   # prints the table and the 1/3 ratios
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NET = textwrap.dedent('''
    import torch
    import torchvision

    def make(channels=3):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10)
        if channels != 3:
            model.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
        return model
''')


def _time_v(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    text = proc.stderr

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()

    wall = field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")
    return {"wall": sum(float(v) * 60 ** i for i, v in enumerate(reversed(wall))),
            "user": float(field("User time (seconds)")), "sys": float(field("System time (seconds)")),
            "rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()

    from explain_cli.config import PreprocessConfig
    from explain_cli.images import load_preprocessed

    root = Path(tempfile.mkdtemp(prefix="bench-channels-"))
    (root / "chbench.py").write_text(NET)
    rng = np.random.default_rng(0)
    grays = [rng.integers(0, 255, (480, 640), dtype=np.uint8) for _ in range(args.images)]
    for channels, folder in ((1, "gray"), (3, "rgb")):
        (root / folder).mkdir()
        for i, g in enumerate(grays):
            img = Image.fromarray(g)
            (img if channels == 1 else img.convert("RGB")).save(root / folder / f"{i:03d}.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(root)])}
    rows = {}
    for channels, folder in ((1, "gray"), (3, "rgb")):
        stats = [0.5] * channels, [0.25] * channels
        pre = PreprocessConfig(size=args.size, channels=channels, mean=stats[0], std=stats[1])
        files = sorted((root / folder).iterdir())
        start = time.perf_counter()
        for path in files:
            load_preprocessed(path, pre)
        decode = (time.perf_counter() - start) / len(files)
        config = {"model": {"arch": "python:chbench:make", "kwargs": {"channels": channels}, "layer": "input"},
                  "preprocess": {"size": args.size, "channels": channels, "mean": stats[0], "std": stats[1]},
                  "input": {"dir": folder}, "background": {"from_input": 4},
                  "explainer": {"name": "gradient", "nsamples": 16},
                  "output": {"dir": f"out-{channels}", "format": "png", "top_k": 2},
                  "device": "cpu", "seed": 0}
        path = root / f"c{channels}.yaml"
        path.write_text(yaml.safe_dump(config))
        run = _time_v([sys.executable, "-m", "explain_cli", "run", str(path), "--no-progress", "-q"], env)
        rows[channels] = {"decode_ms": decode * 1000, **run}
    print(f"{args.images} images {args.size} px, resnet18 (random), gradient nsamples 16, load {os.getloadavg()[0]:.1f}")
    print(f"| channels | decode+preprocess ms/image | run wall s | user s | sys s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for channels, r in rows.items():
        print(f"| {channels} | {r['decode_ms']:.2f} | {r['wall']:.2f} | {r['user']:.2f} | {r['sys']:.2f} | {r['rss_mb']:.0f} |")
    one, three = rows[1], rows[3]
    print(f"ratio 1-channel / 3-channel: decode {one['decode_ms'] / three['decode_ms']:.2f}x, "
          f"run wall {one['wall'] / three['wall']:.2f}x, peak RSS {one['rss_mb'] / three['rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
