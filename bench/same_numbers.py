"""Same numbers before and after a refactor: run every explainer of a source tree on a tiny model
and a few images, save what it computed, and compare two such saves exactly.

    python bench/same_numbers.py save SRC OUT    # runs explain_cli from the tree SRC (PYTHONPATH=SRC)
    python bench/same_numbers.py compare A B     # exit 1 on any difference in the numbers

What is saved per case (a case is one config: gradient input/layer paths, deep at the input and at a
layer, partition, kernel with a fixed and an automatic nsamples, amortized after a tiny training,
a sharded run merged, a resumed run, a pre-tiled slide): topk.csv, values/*.npz (output.save_values),
merged/slide outputs, the trained explainer's weights, and run.json without its timings. The numbers
(topk.csv, *.npz, explainer weights) must be equal bit for bit; run.json keys are listed when they
differ (its schema may change, its content should not).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

TINY_MODEL = textwrap.dedent('''
    import torch
    from torch import nn

    def make(num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))
''')

BASE = {
    "model": {"arch": "python:snnet:make", "num_classes": 3, "checkpoint": "tiny.pt", "layer": "input"},
    "labels": "labels.txt",
    "preprocess": {"size": 16},
    "input": {"dir": "images"},
    "background": {"from_input": 3},
    "output": {"dir": "out", "format": "png", "top_k": 2, "save_values": True},
    "batch_size": 64, "device": "cpu", "seed": 0, "workers": 0,
}

# name -> (config changes, extra command-line arguments per invocation)
CASES: dict[str, tuple[dict, list[list[str]]]] = {
    "gradient_input": ({"explainer": {"name": "gradient", "nsamples": 16, "path": "input"}}, [[]]),
    "gradient_layer": ({"model": {"layer": "2"}, "explainer": {"name": "gradient", "nsamples": 16, "path": "layer"},
                        "metrics": ["deletion", "insertion"], "metrics_steps": 4}, [[]]),
    "gradient_layer_inputpath": ({"model": {"layer": "2"},
                                  "explainer": {"name": "gradient", "nsamples": 8, "path": "input",
                                                "sampling": "random"}}, [[]]),
    "deep_input": ({"explainer": {"name": "deep"}}, [[]]),
    "deep_layer": ({"model": {"layer": "2"}, "explainer": {"name": "deep"},
                    "targets": {"classes": [0, "top_k"]}}, [[]]),
    "partition": ({"explainer": {"name": "partition", "max_evals": 40, "batch_size": 10, "mask": "blur(4,4)"}},
                  [[]]),
    "kernel": ({"explainer": {"name": "kernel", "nsamples": 60, "segments": {"n_segments": 8}}}, [[]]),
    "kernel_grid_auto": ({"explainer": {"name": "kernel", "nsamples": "auto", "max_nsamples": 200,
                                        "segments": {"grid": 3}}}, [[]]),
    "sharded_merged": ({"explainer": {"name": "gradient", "nsamples": 8}},
                       [["--shard", "0/2"], ["--shard", "1/2"], ["MERGE"]]),
    "resumed": ({"explainer": {"name": "deep"}}, [["--limit", "2"], []]),
    "amortized": ({"explainer": {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": 2},
                                 "fill": "mean",
                                 "train": {"epochs": 2, "pairs": 2, "images_per_step": 4, "width": 4,
                                           "augment": False, "holdout": 0.25, "validate_nsamples": 8,
                                           "validate_images": 1}}},
                  [["TRAIN"], []]),
    "slide_tiles": ({"input": {"dir": "tiles"}, "explainer": {"name": "gradient", "nsamples": 8},
                     "slides": {"from_names": r"(?P<slide>[^/]+)/tile_x(?P<x>\d+)_y(?P<y>\d+)", "mpp": 1.0,
                                "tile": 16}}, [[]]),
}

VOLATILE = {"seconds", "started", "finished", "time", "date", "host", "hostname", "pid", "wall", "elapsed",
            "user", "duration", "cpu_seconds", "rss", "peak_rss", "python", "versions", "torch", "numpy",
            "platform", "command", "cwd", "created", "images_per_second", "throughput", "timings", "batch_size_timing",
            "ctime_ns", "mtime_ns", "inode", "shard_seconds_total"}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _project(root: Path) -> None:
    import torch
    from PIL import Image

    sys.path.insert(0, str(root))
    (root / "snnet.py").write_text(TINY_MODEL)
    import snnet  # noqa: E402

    torch.save(snnet.make(3).state_dict(), root / "tiny.pt")
    (root / "labels.txt").write_text("cat\ndog\nfish\n")
    rng = np.random.default_rng(0)
    for name in ["a/one.png", "a/two.png", "b/one.png", "three.png", "four.png", "five.png"]:
        path = root / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(path)
    for slide in ("s1", "s2"):
        for x in (0, 16):
            for y in (0, 16):
                path = root / "tiles" / slide / f"tile_x{x}_y{y}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _strip(data):
    if isinstance(data, dict):
        return {k: _strip(v) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [_strip(v) for v in data]
    return data


def _tensors(data, prefix: str = "") -> dict[str, np.ndarray]:
    """Every tensor or number of a torch.save'd dict, by its dotted key."""
    import torch

    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_tensors(v, f"{prefix}{k}."))
        return out
    if isinstance(data, torch.Tensor):
        return {prefix[:-1]: data.detach().cpu().numpy()}
    if isinstance(data, (int, float)) and not isinstance(data, bool) and "seconds" not in prefix:
        return {prefix[:-1]: np.asarray(data)}
    return {}


def _keep(case_dir: Path, dest: Path, root: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(case_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(case_dir)
        if path.suffix in (".csv", ".npz", ".npy") or path.name == "explainer.pt":
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.name == "explainer.pt":
                import torch

                state = torch.load(path, weights_only=True)
                np.savez(target.with_suffix(".npz"), **_tensors(state))
            else:
                shutil.copyfile(path, target)
        elif path.name in ("run.json", "slide.json"):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(_strip(json.loads(path.read_text())), indent=1, sort_keys=True)
            target.write_text(text.replace(str(root), "<root>"))


def save(src: Path, out: Path) -> None:
    """Run every case with explain_cli imported from ``src``; keep the numbers in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(src.resolve()), OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _project(root)
        env["PYTHONPATH"] += os.pathsep + str(root)
        import yaml

        for name, (changes, calls) in CASES.items():
            case = root / name
            case.mkdir()
            config = _merge(BASE, changes)
            config["output"] = dict(config["output"], dir=str(case / "out"))
            config["input"] = dict(config["input"], dir=str(root / config["input"]["dir"]))
            config["model"] = dict(config["model"], checkpoint=str(root / "tiny.pt"))
            config["labels"] = str(root / "labels.txt")
            if config["explainer"]["name"] == "amortized":
                config["explainer"]["checkpoint"] = str(case / "explainer.pt")
            path = case / "config.yaml"
            path.write_text(yaml.safe_dump(config))
            for extra in calls:
                if extra == ["TRAIN"]:
                    args = ["train", str(path), "--quiet"]
                elif extra == ["MERGE"]:
                    args = ["merge", str(case / "out")]
                else:
                    args = ["run", str(path), "--no-progress", *extra]
                done = subprocess.run([sys.executable, "-m", "explain_cli", *args], cwd=root, env=env,
                                      capture_output=True, text=True)
                if done.returncode not in (0, 3):  # kept as far as it got; compare lists what is missing
                    print(f"{name}: FAILED: {' '.join(args)} exited {done.returncode}\n{done.stderr[-2000:]}",
                          flush=True)
                    break
            _keep(case, out / name, root)
            print(f"{name}: saved", flush=True)


def _csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as fh:
        return list(csv.reader(fh))


def compare(a: Path, b: Path) -> int:
    bad, notes = [], []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    for rel in sorted(files_a ^ files_b):
        (bad if rel.suffix != ".json" else notes).append(f"only in {'A' if rel in files_a else 'B'}: {rel}")
    for rel in sorted(files_a & files_b):
        pa, pb = a / rel, b / rel
        if rel.suffix == ".csv":
            if _csv_rows(pa) != _csv_rows(pb):
                bad.append(f"{rel}: rows differ")
        elif rel.suffix == ".npz":
            za, zb = np.load(pa, allow_pickle=False), np.load(pb, allow_pickle=False)
            if sorted(za.files) != sorted(zb.files):
                bad.append(f"{rel}: arrays {sorted(za.files)} vs {sorted(zb.files)}")
            for key in sorted(set(za.files) & set(zb.files)):
                if za[key].shape != zb[key].shape or za[key].dtype != zb[key].dtype or \
                        not np.array_equal(za[key], zb[key], equal_nan=za[key].dtype.kind in "fc"):
                    bad.append(f"{rel}[{key}]: values differ")
        elif rel.suffix == ".json":
            ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
            if ja != jb:
                keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k))
                notes.append(f"{rel}: keys differ: {keys}")
    checked = len(files_a & files_b)
    for line in notes:
        print("note:", line)
    for line in bad:
        print("DIFFERENT:", line)
    print(f"{checked} files compared; {len(bad)} numeric differences, {len(notes)} run.json notes")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("save", "compare"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "save":
        save(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
