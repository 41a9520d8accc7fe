"""Whole-process throughput: `explain-cli run` as users run it, today's commit vs this checkout.

    python bench/e2e.py                                   # CPU table: conv model, SVG and PNG
    python bench/e2e.py --baseline-ref 0ac58e0 --repeats 3
    python bench/e2e.py --device cuda --model lite0 --large 200 --arms now engine
    python bench/e2e.py --model lite0 --jobs gradient-blocks2 --small 2 --large 4 --arms now engine

Each timing is a separate `python -m explain_cli run` process on a folder of 300x300 JPEGs.
images/s is the marginal rate between a small and a large folder,
(large - small) / (t_large - t_small), so start-up (imports, model, background, worker
processes) cancels out; start-up is reported separately as the time the run would take for
0 images. Arms are interleaved (today, now, today, now, ...; every arm, format and folder once
per repeat) and each timing is the median of --repeats, since a shared machine is noisy. "CPU ms/image" is the marginal CPU time (user +
system, the main process and its workers) per image: unlike images/s it does not depend on
what else runs on the machine.

Arms:

* today  - the --baseline-ref commit, checked out into a temporary git worktree and run with
           PYTHONPATH pointing at it (so the same venv, data and machine).
* now    - this checkout.
* engine - (for --model lite0) the explainer alone on pre-decoded tensors in this process, the
           same class and calls `explain-cli run` uses (pipeline.make_explainer ->
           explain_with_backoff, images_per_step images per call): the ceiling a whole process
           can approach. Rate = images / seconds after a warm-up step.

Models: `conv` (a negligible one-conv `python:` factory model, 10 classes; the job is gradient
at the input with nsamples 2, top-2, 224 px: what is measured is the pipeline itself) and
`lite0` (the demo's EfficientNet-Lite0 with the jobs of the GPU table of docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
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

from explain_cli.job import usable_cores  # noqa: E402
DEFAULT_BASELINE = "0ac58e0"  # the commit before the overlapped stages (issue 8)

CONV_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def make(num_classes=10):
        """One conv, pooled: costs next to nothing, so the run measures the pipeline."""
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
''')

# The GPU table's jobs on lite0 (issue 8 item 5): name -> config overrides.
LITE0_JOBS = {
    "gradient-blocks2": {"model.layer": "blocks.2", "explainer": {"name": "gradient", "nsamples": 200}},
    "gradient-input": {"model.layer": "input", "explainer": {"name": "gradient", "nsamples": 200}},
    "deep": {"model.layer": "input", "explainer": {"name": "deep", "max_background": 8},
             "background.from_input": 8},
    "partition": {"model.layer": "input", "explainer": {"name": "partition", "mask": "blur(128,128)",
                                                         "max_evals": 500}},
    "kernel": {"model.layer": "input", "explainer": {"name": "kernel", "nsamples": 1000}},
}


def make_images(folder: Path, count: int, side: int = 300) -> None:
    """``count`` distinct 300x300 JPEGs from the sample photos (shifted and mirrored)."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((REPO / "sample_images").rglob("*.jpg"))
    photos = [np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.BILINEAR)) for p in sources]
    for i in range(count):
        arr = np.roll(photos[i % len(photos)], shift=3 * i, axis=1)
        if (i // len(photos)) % 2:
            arr = arr[:, ::-1]
        Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"img{i:04d}.jpg", quality=90)


def _set(data: dict, dotted: str, value) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def write_config(root: Path, model: str, job: str, fmt: str, sets: list[str]) -> Path:
    """A config for one job in ``root`` (input and output are given on the command line);
    ``sets`` (KEY=VALUE, YAML values) are written into it, so every arm sees them."""
    if model == "conv":
        (root / "e2enet.py").write_text(CONV_MODEL)
        (root / "labels.txt").write_text("".join(f"class {i}\n" for i in range(10)))
        config = {
            "model": {"arch": "python:e2enet:make", "num_classes": 10, "layer": "input"},
            "labels": "labels.txt",
            "preprocess": {"size": 224},
            "input": {"dir": "unused"},
            "background": {"from_input": 4},
            "explainer": {"name": "gradient", "nsamples": 2},
            "output": {"format": fmt, "top_k": 2},
            "batch_size": 64, "seed": 0,
        }
    else:
        config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
        config["input"] = {"dir": "unused"}
        config["output"] = {"format": fmt, "top_k": 2}
        config["batch_size"] = 64
        config["background"] = {"from_input": 8}
        for key, value in LITE0_JOBS[job].items():
            _set(config, key, value)
    for item in sets:
        key, _, value = item.partition("=")
        _set(config, key, yaml.safe_load(value))
    path = root / f"{model}-{job}-{fmt}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def baseline_worktree(ref: str, where: Path) -> Path:
    """Check ``ref`` out (detached) into a temporary worktree of this repository."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(where), ref],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return where


def check_import(code_root: Path, cwd: Path) -> None:
    """Each arm must run its own code, not an installed copy or the current folder's."""
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    where = subprocess.run([sys.executable, "-c", "import explain_cli; print(explain_cli.__file__)"],
                           env=env, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(code_root.resolve()):
        sys.exit(f"PYTHONPATH={code_root} imports explain_cli from {where}")


def timed_run(code_root: Path, config: Path, folder: Path, out: Path, device: str,
              extra: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and its workers) of one whole `explain-cli run`
    process (exit 0 required). CPU time does not depend on what else the machine is doing."""
    env = {**os.environ, "PYTHONPATH": str(code_root), "MPLBACKEND": "Agg"}
    for name in [k for k in env if k.startswith("SLURM_")]:
        env.pop(name)
    cmd = [sys.executable, "-m", "explain_cli", "run", str(config), "--input", str(folder),
           "--output", str(out), "--no-progress", "-q", "--device", device, *extra]
    log = out.parent / f"{out.name}.stderr"
    start = time.perf_counter()
    with open(log, "w") as err:
        # cwd: a folder without explain_cli in it (`python -m` puts the cwd before PYTHONPATH)
        proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}")
    log.unlink()
    return seconds, usage.ru_utime + usage.ru_stime


def engine_rate(config: Path, folder: Path, device: str, count: int, sets: list[str]) -> float:
    """images/s of the explainer alone on pre-decoded tensors, as `explain-cli run` calls it."""
    import torch

    from explain_cli.config import load_config
    from explain_cli.pipeline import (RunOptions, empty_background, explain_with_backoff, image_seed,
                                      load_background, make_explainer, prepare)
    from explain_cli.stages import decode_step

    cfg = load_config(config, sets, {"input.dir": str(folder), "device": device})
    prep = prepare(cfg, RunOptions())
    background = load_background(prep) if prep.explainer_class.uses_background else empty_background(prep)
    explainer = make_explainer(prep, background)
    step = getattr(explainer, "images_per_step", 8)
    decoded = decode_step(prep.input_dir, prep.images[:count], cfg.preprocess)
    tensors = torch.from_numpy(np.stack([t for _, _, t in decoded.good])).to(prep.device)
    seeds = [image_seed(cfg.seed, rel) for rel, _, _ in decoded.good]
    top_k = min(cfg.output.top_k, prep.num_outputs)

    def sync():
        if prep.device.type == "cuda":
            torch.cuda.synchronize(prep.device)

    explain_with_backoff(explainer, tensors[:step], top_k, seeds[:step])  # warm-up
    sync()
    start = time.perf_counter()
    for i in range(0, len(seeds), step):
        explain_with_backoff(explainer, tensors[i:i + step], top_k, seeds[i:i + step])
    sync()
    return len(seeds) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["conv", "lite0"], default="conv")
    parser.add_argument("--jobs", nargs="+", default=None,
                        help=f"lite0 jobs (default: all): {', '.join(LITE0_JOBS)}")
    parser.add_argument("--formats", nargs="+", choices=["svg", "png"], default=None,
                        help="overlay formats (default: svg png for conv, svg for lite0)")
    parser.add_argument("--arms", nargs="+", choices=["today", "now", "engine"], default=None,
                        help="default: today now (conv), now engine (lite0)")
    parser.add_argument("--baseline-ref", default=DEFAULT_BASELINE, help="the 'today' commit")
    parser.add_argument("--small", type=int, default=40, help="images in the small folder")
    parser.add_argument("--large", type=int, default=400, help="images in the large folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="sets", action="append", default=[],
                        help="KEY=VALUE written into the config of every arm (repeatable), "
                             "e.g. explainer.nsamples=4 for a quick check")
    parser.add_argument("--now-set", dest="now_sets", action="append", default=[],
                        help="KEY=VALUE for the 'now' and 'engine' arms only (keys 'today' does not "
                             "know), e.g. workers=2 or batch_size=auto")
    args = parser.parse_args()
    jobs = ["gradient-nsamples2"] if args.model == "conv" else (args.jobs or list(LITE0_JOBS))
    formats = args.formats or (["svg", "png"] if args.model == "conv" else ["svg"])
    arms = args.arms or (["today", "now"] if args.model == "conv" else ["now", "engine"])
    if not 0 < args.small < args.large:
        parser.error("need 0 < --small < --large")

    with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
        tmp = Path(tmp)
        folders = {n: tmp / f"in{n}" for n in (args.small, args.large)}
        for n, folder in folders.items():
            make_images(folder, n)
        roots = {"now": REPO}
        if "today" in arms:
            roots["today"] = baseline_worktree(args.baseline_ref, tmp / "today")
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        process_arms = [a for a in arms if a != "engine"]
        times: dict[tuple, list[float]] = {}
        cpu_times: dict[tuple, list[float]] = {}
        engine: dict[str, float] = {}
        try:
            for root in roots.values():
                check_import(root, tmp)
            configs = {(job, fmt): write_config(tmp, args.model, job, fmt, args.sets)
                       for job in jobs for fmt in formats}
            for rep in range(args.repeats):  # repeats outermost: a busy spell hits every arm alike
                for (job, fmt), config in configs.items():
                    for n in (args.small, args.large):
                        for arm in process_arms:
                            extra = [a for s in args.now_sets for a in ("--set", s)] if arm == "now" else []
                            out = tmp / f"out-{arm}-{job}-{fmt}-{n}-{rep}"
                            t, cpu = timed_run(roots[arm], config, folders[n], out, args.device, extra)
                            times.setdefault((job, fmt, arm, n), []).append(t)
                            cpu_times.setdefault((job, fmt, arm, n), []).append(cpu)
                            subprocess.run(["rm", "-rf", str(out)], check=True)
            if "engine" in arms:
                for job in jobs:
                    engine[job] = statistics.median(
                        engine_rate(configs[(job, formats[0])], folders[args.large], args.device,
                                    args.large, args.now_sets)
                        for _ in range(args.repeats))
        finally:
            if "today" in roots:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(roots["today"])],
                               check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    print(f"# bench/e2e.py, {time.strftime('%Y-%m-%d %H:%M')}, now = {commit}, today = {args.baseline_ref}, "
          f"device {args.device}, {usable_cores()} usable CPU cores, {args.small} vs {args.large} images, "
          f"median of {args.repeats}")
    print("# " + " ".join(sys.argv))
    print()
    print("| job | format | arm | images/s | start-up (s) | "
          f"{args.small} images (s) | {args.large} images (s) | CPU ms/image | vs today | vs engine |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for job in jobs:
        for fmt in formats:
            rates = {}
            for arm in process_arms:
                t_small = statistics.median(times[(job, fmt, arm, args.small)])
                t_large = statistics.median(times[(job, fmt, arm, args.large)])
                if t_large <= t_small:
                    sys.exit(f"{job} {fmt} {arm}: the large folder was not slower than the small one "
                             f"({t_large:.2f} s vs {t_small:.2f} s): too few images or a noisy machine")
                rate = (args.large - args.small) / (t_large - t_small)
                cpu = [statistics.median(cpu_times[(job, fmt, arm, n)]) for n in (args.small, args.large)]
                cpu_ms = 1000 * (cpu[1] - cpu[0]) / (args.large - args.small)
                rates[arm] = (rate, t_small - args.small / rate, t_small, t_large, cpu_ms)
            for arm in process_arms:
                rate, startup, t_small, t_large, cpu_ms = rates[arm]
                vs_today = f"{rate / rates['today'][0]:.2f}x" if "today" in rates and arm != "today" else "-"
                vs_engine = f"{rate / engine[job]:.2f}x" if job in engine else "-"
                print(f"| {job} | {fmt} | {arm} | {rate:.1f} | {startup:.2f} | {t_small:.2f} | {t_large:.2f} | "
                      f"{cpu_ms:.1f} | {vs_today} | {vs_engine} |")
            if job in engine and fmt == formats[0]:
                print(f"| {job} | - | engine | {engine[job]:.1f} | - | - | - | - | - | 1.00x |")


if __name__ == "__main__":
    main()
