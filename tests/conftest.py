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
    import torch
    from torch import nn

    def make(num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))
''')


def write_images(root: Path, names: list[str], size: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A config dir with tinynet.py, a checkpoint, labels, images/ and config.yaml; returns paths."""
    import torch

    (tmp_path / "tinynet.py").write_text(TINY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    sys.modules.pop("tinynet", None)
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
