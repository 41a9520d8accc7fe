"""Shared fixtures: a tiny model as a python factory, a folder of small images, a config."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    import torch
    from torch import nn

    def make(num_classes=3):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))
        if os.environ.get("TINY_CALLS"):  # one byte per forward call, before any gate waits
            model.register_forward_pre_hook(_count(Path(os.environ["TINY_CALLS"])))
        if os.environ.get("TINY_GATE"):  # tests that signal a run: see conftest.gated_env
            model.register_forward_pre_hook(_gate(Path(os.environ["TINY_GATE"]), Path(os.environ["TINY_GATE_CSV"])))
        return model

    def _count(calls):
        def hook(module, args):
            with calls.open("ab") as fh:
                fh.write(b".")
            return None
        return hook

    def _gate(hold, csv):
        # Once csv has rows (a step is written), every forward waits while hold exists, after
        # creating hold.waiting: the run is then mid-step, with images left to do.
        def hook(module, args):
            if not hold.exists() or not csv.exists() or len(csv.read_text().splitlines()) < 2:
                return None
            Path(str(hold) + ".waiting").touch()
            while hold.exists():
                time.sleep(0.01)
            return None
        return hook
''')


def gated_env(project: Path, csv: Path) -> tuple[dict[str, str], Path]:
    """Environment that makes the tiny model of ``project`` stop in the step after the first
    rows of ``csv`` are written, until the returned hold file is removed: a test that signals a
    run then knows it is mid-run (neither finished nor before its first step) however loaded
    the machine is. Remove the hold file after sending the signal."""
    hold = project / "gate.hold"
    hold.touch()
    return {"TINY_GATE": str(hold), "TINY_GATE_CSV": str(csv)}, hold


def wait_for_gate(proc, hold: Path, timeout: float = 300) -> None:
    """Wait until the gated run is held mid-run (see gated_env); fail if it ended first."""
    import time

    deadline = time.monotonic() + timeout
    marker = Path(str(hold) + ".waiting")
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it was held: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run was not held in time")
        time.sleep(0.02)


def write_images(root: Path, names: list[str], size: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)


SLURM_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX",
              "SLURM_ARRAY_JOB_ID")


@pytest.fixture(autouse=True)
def _no_slurm_env(monkeypatch):
    """Tests may themselves run inside a Slurm job: never pick up its array task as a shard."""
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


def importable_module(folder: Path, name: str, source: str, monkeypatch) -> None:
    """Write ``folder/name.py`` and make it importable here and in subprocesses (a ``python:`` model
    factory beside the config, as users have it); a module of that name imported before is forgotten."""
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop(name, None)


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A config dir with tinynet.py, a checkpoint, labels, images/ and config.yaml; returns paths."""
    import torch

    importable_module(tmp_path, "tinynet", TINY_MODEL, monkeypatch)
    import tinynet  # noqa: E402

    torch.save(tinynet.make(3).state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "labels.txt").write_text("cat & dog\n<bird>\nfish $x$\n")
    write_images(tmp_path / "images", ["a/one.png", "a/two.jpg", "b/one.png", "three.bmp", "skip-02.png"])
    config = {
        "model": {"arch": "python:tinynet:make", "num_classes": 3, "checkpoint": "tiny.pt", "layer": "input"},
        "labels": "labels.txt",
        "preprocess": {"size": 16},
        "input": {"dir": "images", "exclude": ["*-02*"]},
        "background": {"from_input": 4},
        "explainer": {"name": "gradient", "nsamples": 16},
        "output": {"dir": "out", "format": "svg", "top_k": 2},
        "batch_size": 32,
        "device": "cpu",
        "seed": 0,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp_path
