"""``resize: crop``'s TWO_STEP_AREA (explain_cli/images.py): torchvision-exact two-step resize while the
intermediate image is at most that many times the output's area, else the one-step box resample.

Per image shape: CPU ms per image of the two paths (threshold 0: always box; 16: the default), so the
bound's cost is visible; peak RSS of each, in a child process under /usr/bin/time -v.

    python bench/crop.py            # prints the table
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(640, 480), (4000, 3000), (3000, 200), (20000, 1)]

CHILD = """
import sys, time, numpy as np
sys.path.insert(0, {repo!r})
from PIL import Image
from explain_cli import images
from explain_cli.config import PreprocessConfig
images.TWO_STEP_AREA = float(sys.argv[3])
w, h = int(sys.argv[1]), int(sys.argv[2])
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
cfg = PreprocessConfig(size=224, resize="crop")
n = 5
t = time.process_time()
for _ in range(n):
    images.model_input(img, cfg)
print((time.process_time() - t) / n * 1000)
"""


def main() -> None:
    print("| image (w x h) | path | CPU ms/image | peak RSS MB (process, image included) |")
    print("|---|---|---|---|")
    for w, h in SHAPES:
        for label, area in (("one-step box (threshold 0)", 0), ("default (threshold 16)", 16)):
            proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", CHILD.format(repo=str(REPO)),
                                   str(w), str(h), str(area)], capture_output=True, text=True, check=True)
            rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
            print(f"| {w} x {h} | {label} | {float(proc.stdout):.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
