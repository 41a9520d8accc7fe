"""CPU batch sizes: whole `explain-cli run` processes at batch_size auto and fixed 8/16/32/64.

    python bench/cpu_batch.py                       # every explainer, demo model, 3 sample photos
    python bench/cpu_batch.py --jobs gradient partition --repeats 3
    python bench/cpu_batch.py --jobs gradient --batches auto 16 --allocator keep glibc --shap

Each timing is one `explain-cli run` process under `/usr/bin/time -v` (wall, user, sys, peak RSS)
on the demo's EfficientNet-Lite0 and sample_images/ (the 3 photos the demo selects). Jobs:
gradient (demo.yaml at blocks.2, nsamples 100), deep (deep.yaml), partition (partition.yaml,
max_evals 300), kernel (kernel.yaml, --kernel-nsamples). Arms run interleaved (every job and arm
once per repeat) and each figure is the median of --repeats; the 1-minute load average is
recorded before every run, since the machine may be shared: prefer user+sys and peak RSS there.

--allocator: `keep` is explain-cli as shipped (glibc keeps freed memory, job.keep_freed_memory);
`glibc` runs the same code with glibc's default thresholds (the call is skipped).
--shap: also the shap library doing the gradient job the way the seed notebooks do, as a whole
process (import, model, GradientExplainer((model, blocks[2])), ranked_outputs=2, nsamples 100,
one shap.image_plot figure saved per photo); the table gives shap's wall time / explain-cli's.

The table is appended to --out (bench/results-cpu-batch.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from explain_cli.job import usable_cores  # noqa: E402

JOBS = {  # name -> (config, --set overrides)
    "gradient": ("configs/demo.yaml", ["model.layer=blocks.2", "explainer.nsamples=100"]),
    "deep": ("configs/deep.yaml", []),
    "partition": ("configs/partition.yaml", ["explainer.max_evals=300"]),
    "kernel": ("configs/kernel.yaml", []),
}

# explain-cli's CLI; with "glibc" the allocator call is marked done beforehand, so it is skipped
LAUNCH = ("import sys; import explain_cli.job as job; job._allocator_tuned = sys.argv.pop(1) == 'glibc'; "
          "sys.argv[0] = 'explain-cli'; from explain_cli.cli import main; main()")

SHAP_NOTEBOOK = r'''
import sys, numpy as np, torch, shap, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from explain_cli.config import load_config
from explain_cli.discover import discover_images, source_path
from explain_cli.images import load_preprocessed
from explain_cli.models import build_model, resolve_layer
cfg = load_config(sys.argv[1])
model = build_model(cfg.model, cfg.resolve).eval()
root = cfg.resolve(cfg.input.dir)
paths = [source_path(root, p) for p in discover_images(root, cfg.input.include, cfg.input.exclude)]
loaded = [load_preprocessed(p, cfg.preprocess) for p in paths]
x = torch.from_numpy(np.stack([t for _, t in loaded]))
explainer = shap.GradientExplainer((model, resolve_layer(model, "blocks.2")), x)
values, indexes = explainer.shap_values(x, ranked_outputs=2, nsamples=100)
for i, (pixels, _) in enumerate(loaded):
    maps = [v[i].sum(0) if v[i].shape[0] < v[i].shape[-1] else v[i].sum(-1) for v in values]
    shap.image_plot([m[None, ..., None] for m in maps], pixels[None].astype(float) / 255, show=False)
    plt.savefig(f"{sys.argv[2]}/{i}.png"); plt.close("all")
'''


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def timed(cmd: list[str], env: dict) -> dict:
    """One process under /usr/bin/time -v: wall, user, sys (s), peak RSS (MB), load before."""
    load = load_average()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(["/usr/bin/time", "-v", "-o", report.name, *cmd], env=env, cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        text = report.read()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    fields = dict(line.strip().rsplit(": ", 1) for line in text.splitlines() if ": " in line)
    wall = fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"]
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"wall": seconds, "user": float(fields["User time (seconds)"]),
            "sys": float(fields["System time (seconds)"]),
            "rss": int(fields["Maximum resident set size (kbytes)"]) / 1024, "load": load}


def explain_cli_arm(job: str, batch: str, allocator: str, out: Path, env: dict, kernel_nsamples: int) -> dict:
    config, sets = JOBS[job]
    if job == "kernel":
        sets = sets + [f"explainer.nsamples={kernel_nsamples}"]
    cmd = [sys.executable, "-c", LAUNCH, allocator, "run", config, "--output", str(out), "--overwrite",
           "--no-progress", "-q", "--set", f"batch_size={batch}"]
    for item in sets:
        cmd += ["--set", item]
    result = timed(cmd, env)
    info = json.loads((out / "run.json").read_text())
    result["used"] = info.get("batch_size_used")
    result["probe"] = info.get("batch_size_auto")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    parser.add_argument("--batches", nargs="+", default=["auto", "8", "16", "32", "64"])
    parser.add_argument("--allocator", nargs="+", choices=["keep", "glibc"], default=["keep"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--kernel-nsamples", type=int, default=1000)
    parser.add_argument("--shap", action="store_true", help="also the shap notebook's gradient job (a process)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results-cpu-batch.txt")
    parser.add_argument("--note", default="", help="a line for the table's header (e.g. what ran beside it)")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    arms = [(job, batch, alloc) for job in args.jobs for batch in args.batches for alloc in args.allocator]
    runs: dict[tuple, list[dict]] = {arm: [] for arm in arms}
    shap_runs: list[dict] = []
    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="cpu-batch-") as tmp:
        for repeat in range(args.repeats):
            for arm in arms:
                job, batch, alloc = arm
                result = explain_cli_arm(job, batch, alloc, Path(tmp) / "out", env, args.kernel_nsamples)
                runs[arm].append(result)
                print(f"[{repeat + 1}/{args.repeats}] {job} batch {batch} ({alloc}): wall {result['wall']:.1f} s, "
                      f"user {result['user']:.1f}, sys {result['sys']:.1f}, {result['rss']:.0f} MB, "
                      f"used {result['used']}, load {result['load']:.1f}", file=sys.stderr, flush=True)
            if args.shap:
                script = Path(tmp) / "notebook.py"
                script.write_text(SHAP_NOTEBOOK)
                figures = Path(tmp) / "figures"
                figures.mkdir(exist_ok=True)
                shap_runs.append(timed([sys.executable, str(script), JOBS["gradient"][0], str(figures)], env))
                print(f"[{repeat + 1}/{args.repeats}] shap notebook: wall {shap_runs[-1]['wall']:.1f} s",
                      file=sys.stderr, flush=True)
    loads.append(load_average())

    def med(items: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in items)

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    all_loads = [r["load"] for rs in runs.values() for r in rs] + [r["load"] for r in shap_runs] + loads
    lines = [f"# bench/cpu_batch.py {' '.join(sys.argv[1:])}",
             f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, {cpu}, "
             f"{usable_cores()} usable cores, median of {args.repeats}; 1-min load average before the runs: "
             f"{min(all_loads):.1f}-{max(all_loads):.1f}" + (f"; {args.note}" if args.note else ""),
             "| job | batch | allocator | rows/call used | wall (s) | user (s) | sys (s) | sys share | peak RSS (MB) "
             "| load | wall vs best fixed |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for job in args.jobs:
        for alloc in args.allocator:
            fixed = [med(runs[(job, b, alloc)], "wall") for b in args.batches if b != "auto"]
            best = min(fixed) if fixed else None
            for batch in args.batches:
                rs = runs[(job, batch, alloc)]
                wall, user, system = med(rs, "wall"), med(rs, "user"), med(rs, "sys")
                used = sorted({str(r["used"]) for r in rs})
                ratio = f"{wall / best:.2f}" if best else "-"
                lines.append(f"| {job} | {batch} | {alloc} | {'/'.join(used)} | {wall:.1f} | {user:.1f} | "
                             f"{system:.1f} | {system / (user + system):.0%} | {med(rs, 'rss'):.0f} | "
                             f"{med(rs, 'load'):.1f} | {ratio} |")
    if shap_runs:
        auto = runs.get(("gradient", "auto", args.allocator[0]))
        shap_wall = med(shap_runs, "wall")
        lines.append(f"| gradient | shap notebook (process) | - | - | {shap_wall:.1f} | {med(shap_runs, 'user'):.1f} | "
                     f"{med(shap_runs, 'sys'):.1f} | - | {med(shap_runs, 'rss'):.0f} | {med(shap_runs, 'load'):.1f} | - |")
        if auto:
            lines.append(f"# whole-process ratio, shap notebook wall / explain-cli (batch auto) wall: "
                         f"{shap_wall / med(auto, 'wall'):.2f}x; in CPU time (user+sys): "
                         f"{(med(shap_runs, 'user') + med(shap_runs, 'sys')) / (med(auto, 'user') + med(auto, 'sys')):.2f}x")
    probes = [(arm, r["probe"]) for arm, rs in runs.items() for r in rs if arm[1] == "auto" and r["probe"]]
    for (job, _, alloc), probe in probes:
        lines.append(f"# auto probe, {job} ({alloc}): {json.dumps(probe, sort_keys=True)}")
    text = "\n".join(lines) + "\n\n"
    print(text)
    with open(args.out, "a") as fh:
        fh.write(text)


if __name__ == "__main__":
    main()
