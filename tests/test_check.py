"""``explain-cli check``: the model-randomisation sanity check (Adebayo et al. 2018). A trained tiny
CNN explained by gradient at the input passes (its maps change when the weights are randomised); the
same CNN with a planted fixed edge detector (a buffer, not a learned weight) whose output dominates
the logits fails with exit 5 naming the explainer and layer."""

from __future__ import annotations

import csv
import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from explain_cli.check import EXIT_CHECK_FAILED, cascade_units, randomise, run_check, spearman
from explain_cli.config import load_config

REPO = Path(__file__).resolve().parents[1]
SIZE = 24

MODEL = textwrap.dedent('''
    import torch
    from torch import nn
    import torch.nn.functional as F

    def make(num_classes=2):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                             nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))

    class EdgePrior(nn.Module):
        """A fixed Sobel edge energy (a buffer: no learned weight), added to the logits at a large scale."""

        def __init__(self):
            super().__init__()
            sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
            self.register_buffer("kernel", torch.stack([sobel, sobel.T])[:, None].repeat(3, 1, 1, 1))

        def forward(self, x):
            edges = F.conv2d(x, self.kernel, padding=1, groups=3)
            energy = edges.square().mean((1, 2, 3))
            return 50.0 * torch.stack([energy, energy], 1)

    class WithEdges(nn.Module):
        def __init__(self, num_classes=2):
            super().__init__()
            self.net = make(num_classes)
            self.edges = EdgePrior()

        def forward(self, x):
            return self.net(x) + self.edges(x)

    def make_edges(num_classes=2):
        return WithEdges(num_classes)
''')


def square_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, SIZE, SIZE, 3) uint8 noisy grey images with a 7 px square at a random place, red
    (class 0) or green (class 1), and the classes."""
    rng = np.random.default_rng(seed)
    pixels = rng.normal(128, 20, (n, SIZE, SIZE, 3))
    classes = rng.integers(0, 2, n)
    for i in range(n):
        y, x = rng.integers(0, SIZE - 7, 2)
        pixels[i, y:y + 7, x:x + 7] = (220, 60, 60) if classes[i] == 0 else (60, 220, 60)
    return np.clip(pixels, 0, 255).astype(np.uint8), classes


def normalise(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((pixels / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).astype(np.float32))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny CNN trained for a few seconds (held-out accuracy checked), 6 input images, configs."""
    root = tmp_path_factory.mktemp("check")
    (root / "tinycheck.py").write_text(MODEL)
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("tinycheck")
        model = module.make()
        x, y = square_images(640, seed=0)
        xs, ys = normalise(x), torch.from_numpy(y)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(0)
        for _ in range(6):
            for idx in torch.randperm(len(xs)).split(32):
                loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        tx, ty = square_images(200, seed=1)
        with torch.no_grad():
            accuracy = float((model(normalise(tx)).argmax(1).numpy() == ty).mean())
        assert accuracy >= 0.95, accuracy  # the check's premise: a model that learned something
        torch.save(model.state_dict(), root / "tiny.pt")
        edges = module.make_edges()
        edges.net.load_state_dict(model.state_dict())
        torch.save(edges.state_dict(), root / "edges.pt")
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("tinycheck", None)
    (root / "labels.txt").write_text("red\ngreen\n")
    (root / "input").mkdir()
    for i, pixels in enumerate(square_images(6, seed=2)[0]):
        Image.fromarray(pixels).save(root / "input" / f"{i}.png")
    for name, factory, weights in (("pass.yaml", "make", "tiny.pt"), ("edges.yaml", "make_edges", "edges.pt")):
        config = {"model": {"arch": f"python:tinycheck:{factory}", "num_classes": 2, "checkpoint": weights,
                            "layer": "input"},
                  "labels": "labels.txt", "preprocess": {"size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3},
                  "input": {"dir": "input"}, "background": {"from_input": 6},
                  "explainer": {"name": "gradient", "nsamples": 64}, "output": {"dir": "out", "top_k": 1},
                  "device": "cpu", "workers": 0}
        (root / name).write_text(yaml.safe_dump(config))
    return root


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(cwd)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "explain_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow  # the project fixture trains the CNN once per module: ~25 s on 2 loaded cores
def test_gradient_at_the_input_passes_on_a_trained_cnn(project):
    sys.path.insert(0, str(project))
    try:
        result = run_check(load_config(project / "pass.yaml"), images=6)
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("tinycheck", None)
    assert [s.layer for s in result.steps] == ["6", "2", "0"]  # Linear, then the convolutions, top first
    assert result.passed, [(s.layer, s.median) for s in result.steps]
    assert abs(result.decision.median) < 0.5
    rows = list(csv.DictReader(open(result.output_dir / "check.csv")))
    assert len(rows) == 3 * 7  # 6 images + the median row per step
    verdict = [r for r in rows if r["passed"]]
    assert len(verdict) == 1 and verdict[0]["passed"] == "true" and verdict[0]["step"] == "2"
    assert (result.output_dir / "check.png").stat().st_size > 0
    page = (result.output_dir / "check.html").read_text()
    assert "check passed: explainer gradient at layer input" in page and "data:image/png;base64," in page


@pytest.mark.slow  # the project fixture trains the CNN once per module: ~25 s on 2 loaded cores
def test_a_fixed_edge_detector_fails_with_exit_5(project):
    done = cli("check", "edges.yaml", "--images", "6", "--output", "check-edges", cwd=project)
    assert done.returncode == EXIT_CHECK_FAILED == 5, done.stderr
    assert "check FAILED: explainer gradient at layer input" in done.stderr, done.stderr
    assert "'net.2'" in done.stderr  # the head and the last convolution randomised: still the same map
    rows = [r for r in csv.DictReader(open(project / "check-edges" / "check.csv")) if r["passed"]]
    assert rows[0]["passed"] == "false" and float(rows[0]["spearman"]) >= 0.5


def test_cascade_units_and_randomise():
    import torchvision

    model = torchvision.models.resnet18(num_classes=4)
    names = [n for n, _ in cascade_units(model)]
    assert names[:3] == ["fc", "layer4.1", "layer4.0"] and names[-1] == "bn1+conv1"
    before = model.fc.weight.clone()
    randomise(model.fc, seed=1)
    after = model.fc.weight.clone()
    assert not torch.equal(before, after)
    randomise(model.fc, seed=1)
    assert torch.equal(after, model.fc.weight)  # seeded


def test_spearman():
    a = np.arange(10.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, np.zeros(10)) is None


@pytest.mark.slow  # the project fixture trains the CNN once per module: ~25 s on 2 loaded cores
def test_the_run_report_shows_the_check(project):
    """report.html of the run folder gains a Sanity check section once `check` wrote output.dir/check:
    the verdict, the median Spearman per step and the first image's map after each step."""
    out = project / "out"
    shutil.rmtree(out / "check", ignore_errors=True)  # test_gradient_at_the_input_passes_on_a_trained_cnn's
    done = cli("run", "pass.yaml", "--no-progress", cwd=project)
    assert done.returncode == 0, done.stderr
    assert 'id="check"' not in (out / "report.html").read_text(encoding="utf-8")
    sys.path.insert(0, str(project))
    try:
        result = run_check(load_config(project / "pass.yaml"), images=6, steps=2)
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("tinycheck", None)
    assert result.output_dir == out / "check"
    maps = sorted(p.name for p in (out / "check" / "maps").iterdir())
    assert maps == ["step-0.png", "step-1.png", "step-2.png"]  # the trained model, then each step
    for name in maps:
        with Image.open(out / "check" / "maps" / name) as picture:
            assert picture.size == (120, 120)  # the 24 px map scaled up by 5
    page = (out / "report.html").read_text(encoding="utf-8")  # rewritten by the check
    section = page[page.index('<section id="check">'):]
    section = section[:section.index("</section>")]
    assert '<h2>Sanity check <span class="badge">passed</span></h2>' in section
    assert "explainer gradient at layer input" in section and "6 image(s)" in section
    for step in result.steps:
        assert f'<td class="file">{step.layer}</td><td>{step.median:.3f}</td>' in section
    assert f"median Spearman {result.decision.median:.3f} after step 2" in section
    assert [f"check/maps/{name}" for name in maps] == re.findall(r'<img src="([^"]+)"', section)


def test_the_sanity_section_from_check_csv(tmp_path):
    """A failed check, hostile names escaped, maps that are missing left out; no check/ -> no section."""
    from explain_cli.report import build_report

    out = tmp_path / "out"
    out.mkdir()
    (out / "topk.csv").write_text("image,rank,class_index,class_name,probability\na.png,1,0,cat,0.9\n")
    before = build_report(out)
    assert 'id="check"' not in before
    (out / "check" / "maps").mkdir(parents=True)
    layer = "<b>x</b>"
    with open(out / "check" / "check.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "layer", "image", "spearman", "spearman_abs", "explainer", "explained_layer",
                    "threshold", "decision_step", "passed"])
        w.writerow([1, "fc", "<img>.png", "0.97", "0.9", "gradient", "input", "", "", ""])
        w.writerow([1, "fc", "(median)", "0.97", "0.9", "gradient", "input", 0.5, 2, ""])
        w.writerow([2, layer, "<img>.png", "0.96", "0.9", "gradient", "input", "", "", ""])
        w.writerow([2, layer, "(median)", "0.96", "0.9", "gradient", "input", 0.5, 2, "false"])
    Image.new("RGB", (4, 4)).save(out / "check" / "maps" / "step-0.png")
    Image.new("RGB", (4, 4)).save(out / "check" / "maps" / "step-2.png")
    page = build_report(out)
    start = page.index('<section id="check">')
    assert page[:start] + page[page.index("</section>", start) + len("</section>"):] == before
    assert '<span class="count bad">FAILED</span>' in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page and "&lt;img&gt;.png" in page
    assert "median Spearman 0.960 after step 2" in page
    assert re.findall(r'<img src="([^"]+)"', page) == ["check/maps/step-0.png", "check/maps/step-2.png"]
