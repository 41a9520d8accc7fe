"""Slides (issue 26, item 8): is reading tiles ever the bottleneck, and does memory grow with the slide?

    python bench/slides.py                       # both parts
    python bench/slides.py --part read --tiles 300 --explain 24
    python bench/slides.py --part rss --levels 3 6

Part ``read``: tiles per second read from a synthetic slide through ``TileSource.decode`` (the
decode stage's call: OpenSlide read_region + resize + normalise to 224, configs/slide.yaml's
preprocessing, at its read resolution of 1 um/px) with 1, 2 and 4 reader threads (a
ThreadPoolExecutor over tile names, each arm a fresh TileSource so OpenSlide's tile cache starts
cold; the slide file itself sits in the page cache), against the demo model's images per second:
its bare forward (EfficientNet-Lite0, batch 16, channels-last, inference mode, at the torch thread
count `explain-cli run` sets for a run of that many tiles, and at 2 threads) and the explain rate
of the slide demo's explainer (gradient at blocks.3, nsamples 32, top-1): a whole `explain-cli run
configs/slide.yaml --limit N --no-progress` process, N / wall time (start-up, planning and the
heatmaps included), and the marginal rate N / (wall(N) - wall(0)). The pipeline reads with one
decode thread, one step ahead of the explainer, so the 1-thread rate is the one that counts;
ratio = reading tiles/s / model images/s (> 1: reading keeps up).

Part ``rss``: peak RSS, wall, user and sys (``/usr/bin/time -v``) of `explain-cli run
configs/slide.yaml --limit 16 --set explainer.nsamples=8` on a 20,000 x 20,000 and a 60,000 x
60,000 synthetic slide (the same 16 tiles' worth of work in both), so the difference is what the
slide's size costs (planning: thumbnail + tissue mask + tile list; at the end the heatmaps, which
read the thumbnail again). Also a process that only plans the slide (``plan_file``), to attribute
the difference. Slides are drawn with ``--noise 0 --coverage 0.1`` (flat glass and tissue, 10%
tissue in 3 regions: small files, written in minutes), with ``--levels`` pyramid levels (3: synthetic.py's
default, downsamples 1-4; 6: down to 1/32, like a scanner's pyramid). Target: 60k within 10% of 20k.

Slides are cached under out/bench-slides/ (gitignored); a 60k x 60k slide takes a few minutes of one
core to write (FAST_WRITER). Each result table is printed and appended to bench/results-slides.txt with the
date, the commit, the command and the load average (``os.getloadavg``) beside each measurement.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = REPO / "out" / "bench-slides"
CONFIG = REPO / "configs" / "slide.yaml"
RESULTS = REPO / "bench" / "results-slides.txt"
EXE = [sys.executable, "-m", "explain_cli"]


def load() -> str:
    return "{:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


FAST_WRITER = """
import sys
import numpy as np
from explain_cli.slides import synthetic

def tiles(spec, down, shape):
    # synthetic._tiles, with one shortcut for flat slides (noise 0): a tile whose extent meets no
    # tissue ellipse's and no planted square's bounding box is the constant glass tile that
    # SlideSpec.region would draw (same pixels, ~6 ms less per tile: most of a big slide is glass)
    glass = np.ascontiguousarray(np.broadcast_to(np.clip(synthetic.GLASS, 0, 255).astype(np.uint8),
                                                 (synthetic.TILE, synthetic.TILE, 3)))
    boxes = [(cx - rx, cy - ry, cx + rx, cy + ry) for cx, cy, rx, ry in spec.tissue]
    boxes += [(px, py, px + side, py + side) for px, py, side in spec.planted]
    h, w = shape
    for ty in range(0, h, synthetic.TILE):
        for tx in range(0, w, synthetic.TILE):
            x0, y0 = tx * down, ty * down
            x1, y1 = x0 + synthetic.TILE * down, y0 + synthetic.TILE * down
            if spec.noise == 0 and not any(a < x1 + down and c > x0 - down and b < y1 + down and d > y0 - down
                                           for a, b, c, d in boxes):
                yield glass
            else:
                yield spec.region(x0, y0, synthetic.TILE, synthetic.TILE, down)

synthetic._tiles = tiles
synthetic.main(sys.argv[1:])
"""


def slide_file(name: str, size: int, extra: list[str]) -> Path:
    """out/bench-slides/<name>/slide.tif (one slide per folder: input.dir is a folder), written
    with explain_cli.slides.synthetic when missing (its main, with FAST_WRITER's glass shortcut)."""
    path = CACHE / name / "slide.tif"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("slide.tif.part.tif")
        cmd = EXE[:1] + ["-c", FAST_WRITER, str(tmp), "--size", f"{size}x{size}", *extra]
        print(f"writing {path} (explain_cli.slides.synthetic {' '.join(cmd[3:])}) ...", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tmp.rename(path)
        print(f"  {time.perf_counter() - start:.0f} s, {path.stat().st_size / 2**20:.0f} MB", flush=True)
    return path


def time_v(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run ``cmd`` under /usr/bin/time -v: wall, user, sys (s), peak RSS (MB); exits on failure."""
    before = load()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    err = proc.stderr

    def field(name: str) -> str:
        m = re.search(rf"^\s*{re.escape(name)}: (.+)$", err, re.M)
        if m is None:
            sys.exit(f"no '{name}' in /usr/bin/time output:\n{err[-2000:]}")
        return m.group(1).strip()

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {"wall": wall, "user": float(field("User time (seconds)")), "sys": float(field("System time (seconds)")),
            "rss": int(field("Maximum resident set size (kbytes)")) / 1024, "load": f"{before} -> {load()}",
            "log": err}


# --- part 1: reading vs the model ---------------------------------------------------------------

def read_rates(slide: Path, tiles: int, threads: list[int], repeats: int) -> tuple[dict[int, float], dict]:
    """Median tiles/s of TileSource.decode over ``tiles`` tile names per thread count (interleaved)."""
    from explain_cli.config import load_config
    from explain_cli.slides.plan import plan_slides
    from explain_cli.slides.source import TileSource

    cfg = load_config(CONFIG, None, {"input.dir": str(slide.parent)})
    plans = plan_slides(slide.parent, [slide.name], cfg.slides)
    names = plans.images
    step = max(1, len(names) // tiles)
    names = names[::step][:tiles]  # spread over the slide's tissue, row-major
    plan = next(iter(plans.slides.values()))
    geometry = {"tiles_kept": len(plans.images), "tiles_total": plan.tiles_total, "level": plan.level,
                "read_size": plan.read_size, "read_mpp": plan.read_mpp, "timed": len(names)}
    rates: dict[int, list[float]] = {n: [] for n in threads}
    loads: dict[int, list[str]] = {n: [] for n in threads}
    for _ in range(repeats):
        for n in threads:
            source = TileSource(slide.parent, plans)
            source.decode(names[0], cfg.preprocess)  # opens the slide (not timed)
            loads[n].append(load())
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                for _ in pool.map(lambda rel: source.decode(rel, cfg.preprocess), names):
                    pass
            rates[n].append(len(names) / (time.perf_counter() - start))
            source.close()
    geometry["loads"] = {n: ", ".join(v) for n, v in loads.items()}
    geometry["all"] = rates
    return {n: statistics.median(v) for n, v in rates.items()}, geometry


def bare_forward(slide: Path, threads: int, batch: int, batches: int, repeats: int) -> tuple[float, str]:
    """Images/s of the demo model's bare forward on real tiles of the slide, ``threads`` torch threads."""
    import numpy as np
    import torch

    from explain_cli.config import load_config
    from explain_cli.models import build_model, to_channels_last
    from explain_cli.slides.plan import plan_slides
    from explain_cli.slides.source import TileSource

    cfg = load_config(CONFIG, None, {"input.dir": str(slide.parent)})
    plans = plan_slides(slide.parent, [slide.name], cfg.slides)
    source = TileSource(slide.parent, plans)
    x = torch.from_numpy(np.stack([source.decode(rel, cfg.preprocess)[1] for rel in plans.images[:batch]]))
    source.close()
    x = x.contiguous(memory_format=torch.channels_last)
    torch.set_num_threads(threads)
    model = to_channels_last(build_model(cfg.model, cfg.resolve).eval())
    with torch.inference_mode():
        for _ in range(2):
            model(x)
        rates, loads = [], []
        for _ in range(repeats):
            loads.append(load())
            start = time.perf_counter()
            for _ in range(batches):
                model(x)
            rates.append(batch * batches / (time.perf_counter() - start))
    return statistics.median(rates), ", ".join(loads)


def explain_run(slide: Path, limit: int, out: Path) -> dict[str, float]:
    """A whole `explain-cli run configs/slide.yaml` process on the slide, ``--limit`` tiles."""
    folder = out / f"run{limit}"
    return time_v(EXE + ["run", str(CONFIG), "--input", str(slide.parent), "--output", str(folder), "--no-progress",
                         "--limit", str(limit), "--device", "cpu"])


def part_read(args, lines: list[str]) -> None:
    from explain_cli.job import resolve_workers, torch_threads, usable_cores

    slide = slide_file("read-20000", 20000, [])  # synthetic.py's defaults: noise 1, 35% tissue, 3 levels
    cores = usable_cores()
    cli_threads = torch_threads(cores, resolve_workers("auto", cores, args.explain)) or cores
    rates, geo = read_rates(slide, args.tiles, args.threads, args.repeats)
    model: list[tuple[str, float, str]] = []
    for threads in sorted({cli_threads, cores}):
        rate, loads = bare_forward(slide, threads, 16, args.batches, args.repeats)
        note = " (what `run` sets for this many tiles)" if threads == cli_threads else ""
        model.append((f"bare forward, batch 16, {threads} torch thread(s){note}", rate, loads))
    with tempfile.TemporaryDirectory() as tmp:
        zero = explain_run(slide, 0, Path(tmp))
        full = explain_run(slide, args.explain, Path(tmp))
    model.append((f"explain-cli run configs/slide.yaml --limit {args.explain}: tiles / wall ({full['wall']:.1f} s)",
                  args.explain / full["wall"], full["load"]))
    model.append((f"same, marginal: tiles / (wall - wall of --limit 0, {zero['wall']:.1f} s)",
                  args.explain / max(full["wall"] - zero["wall"], 1e-9), f"{zero['load']}; {full['load']}"))

    lines.append(f"slide: {slide.relative_to(REPO)} (20000 x 20000, 0.5 um/px, synthetic.py defaults), read at "
                 f"level {geo['level']} ({geo['read_mpp']} um/px), {geo['read_size']} px regions -> 224; "
                 f"{geo['tiles_kept']} of {geo['tiles_total']} tiles have tissue, {geo['timed']} timed per arm, "
                 f"median of {args.repeats} interleaved rounds; {cores} usable cores")
    lines.append("")
    lines.append("| reading: TileSource.decode | tiles/s | load (1/5/15 min, per round) |")
    lines.append("| --- | ---: | --- |")
    for n in args.threads:
        runs = " / ".join(f"{r:.0f}" for r in geo["all"][n])
        lines.append(f"| {n} reader thread(s) (rounds: {runs}) | {rates[n]:.1f} | {geo['loads'][n]} |")
    lines.append("")
    head = " | ".join(f"read {n}T / model" for n in args.threads)
    lines.append(f"| model: EfficientNet-Lite0, 224 px | images/s | {head} | load (1/5/15 min) |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in args.threads) + " | --- |")
    for name, rate, loads in model:
        ratios = " | ".join(f"{rates[n] / rate:.1f}x" for n in args.threads)
        lines.append(f"| {name} | {rate:.2f} | {ratios} | {loads} |")
    worst = min(rates[args.threads[0]] / rate for _, rate, _ in model)
    lines.append("")
    lines.append(f"lowest ratio with {args.threads[0]} reader thread (the pipeline's one decode thread): {worst:.1f}x "
                 f"-> reading {'is not' if worst > 1 else 'IS'} the bottleneck for the demo model")
    lines.append(f"explain run --limit {args.explain}: user {full['user']:.1f} s, sys {full['sys']:.1f} s, peak RSS "
                 f"{full['rss']:.0f} MB; --limit 0: wall {zero['wall']:.1f} s, user {zero['user']:.1f} s")


# --- part 2: peak RSS vs the slide's size --------------------------------------------------------

#: The rss slides: flat colours (small files, quick to write) and 10% tissue in 3 regions.
RSS_SLIDE = ["--noise", "0", "--coverage", "0.1"]

PLAN_ONLY = """
import sys
from pathlib import Path
from explain_cli.config import load_config
from explain_cli.slides.plan import plan_file
slide = Path(sys.argv[1])
cfg = load_config(sys.argv[2], None, {"input.dir": str(slide.parent)})
if sys.argv[3:] != ["imports-only"]:
    plan_file(slide, slide.name, "slide", cfg.slides)
"""

def pyramid(slide: Path) -> tuple[str, str]:
    """The slide's levels, and the level the plan's thumbnail is read from (OpenSlide's best level
    for its downsample; the reader reads it block by block since 39f329b, get_thumbnail read it whole)."""
    import openslide

    from explain_cli.config import load_config
    from explain_cli.slides.plan import thumbnail_size

    cfg = load_config(CONFIG)
    with openslide.OpenSlide(str(slide)) as s:
        mpp = float(s.properties["openslide.mpp-x"])
        size = thumbnail_size(s.dimensions, mpp, cfg.slides.tissue.thumbnail_mpp)
        down = max(d / t for d, t in zip(s.dimensions, size))
        level = s.get_best_level_for_downsample(down)
        w, h = s.level_dimensions[level]
        levels = ", ".join(f"{d:g}" for d in s.level_downsamples)
    return levels, f"level {level}: {w} x {h} ({w * h * 4 / 2**20:.0f} MB as RGBA) -> {size[0]} x {size[1]}"


def part_rss(args, lines: list[str]) -> None:
    slides = {(levels, size): slide_file(f"rss-{size}-L{levels}", size, RSS_SLIDE + ["--levels", str(levels)])
              for levels in args.levels for size in args.sizes}
    base = time_v([sys.executable, "-c", PLAN_ONLY, str(next(iter(slides.values()))), str(CONFIG), "imports-only"])
    rows = []
    for (levels, size), slide in slides.items():
        pyr, thumb = pyramid(slide)
        plan = time_v([sys.executable, "-c", PLAN_ONLY, str(slide), str(CONFIG)])
        with tempfile.TemporaryDirectory() as tmp:
            run = time_v(EXE + ["run", str(CONFIG), "--input", str(slide.parent), "--output", str(Path(tmp) / "o"),
                                "--no-progress", "--limit", "16", "--set", "explainer.nsamples=8", "--device", "cpu"])
        m = re.search(r"slides: \d+ slide\(s\), (\d+) tiles to explain, (\d+) skipped", run["log"])
        kept = f"{m.group(1)} / {int(m.group(1)) + int(m.group(2))}" if m else "?"
        rows.append((levels, size, pyr, thumb, kept, plan, run, slide.stat().st_size / 2**20))
        print(f"  {size} L{levels}: run {run['rss']:.0f} MB, plan only {plan['rss']:.0f} MB", flush=True)
    lines.append(f"Every run: `explain-cli run configs/slide.yaml --input <slide folder> --limit 16 --set "
                 f"explainer.nsamples=8 --no-progress --device cpu` (gradient at blocks.3, top-1, 16 tiles, 2 torch "
                 f"threads, no writer process); plan only: a process that imports what the run imports for planning "
                 f"and calls plan_file once. Imports alone: peak RSS {base['rss']:.0f} MB.")
    lines.append("")
    lines.append("| slide (level 0) | downsamples | file (MB) | thumbnail: read from -> size "
                 "| tiles with tissue / all | run: wall (s) | user (s) | sys (s) | peak RSS (MB) "
                 "| plan only: peak RSS (MB) | wall (s) | load (1/5/15 min) |")
    lines.append("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for levels, size, pyr, thumb, kept, plan, run, mb in rows:
        lines.append(f"| {size:,} x {size:,} | {pyr} | {mb:.0f} | {thumb} | {kept} | {run['wall']:.1f} "
                     f"| {run['user']:.1f} | {run['sys']:.1f} | {run['rss']:.0f} | {plan['rss']:.0f} | {plan['wall']:.1f} "
                     f"| {run['load']} |")
    lines.append("")
    for levels in args.levels:
        by = {size: (run, plan) for lv, size, _, _, _, plan, run, _ in rows if lv == levels}
        lo, hi = min(by), max(by)
        ratio = by[hi][0]["rss"] / by[lo][0]["rss"]
        lines.append(f"{levels} levels: peak RSS {hi} vs {lo}: {ratio:.2f} (target <= 1.10: "
                     f"{'met' if ratio <= 1.10 else 'NOT met'}), {by[hi][0]['rss'] - by[lo][0]['rss']:+.0f} MB; "
                     f"plan only {by[hi][1]['rss'] / by[lo][1]['rss']:.2f}, "
                     f"{by[hi][1]['rss'] - by[lo][1]['rss']:+.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["read", "rss", "both"], default="both")
    parser.add_argument("--tiles", type=int, default=300, help="tiles read per reader arm")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4], help="reader thread counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="batches of 16 per timed bare-forward round")
    parser.add_argument("--explain", type=int, default=24, help="tiles of the timed explain-cli run")
    parser.add_argument("--levels", type=int, nargs="+", default=[3, 6], help="pyramid levels of the rss slides")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 60000])
    args = parser.parse_args()
    if shutil.which("/usr/bin/time") is None:
        sys.exit("needs /usr/bin/time (GNU time)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    dirty = " (+ uncommitted changes)" if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                          capture_output=True, text=True, cwd=REPO).stdout.strip() else ""
    import torch

    lines = [f"# bench/slides.py, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}{dirty}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, load at start {load()}",
             f"# python bench/slides.py {' '.join(sys.argv[1:])}".rstrip(), ""]
    if args.part in ("read", "both"):
        part_read(args, lines)
        lines.append("")
    if args.part in ("rss", "both"):
        part_rss(args, lines)
        lines.append("")
    lines.append(f"# load at end {load()}")
    text = "\n".join(lines) + "\n"
    print(text)
    with RESULTS.open("a") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
