"""The committed figures (docs/*.png that show a run) are not older than the code that draws them.

scripts/figures.py stamps each PNG with a hash of its drawing code and config; these tests only
recompute the hashes and read the PNG metadata (no model, no GPU, no browser: milliseconds)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _figures_module():
    spec = importlib.util.spec_from_file_location("figures_script", REPO / "scripts" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


figures = _figures_module()


@pytest.mark.parametrize("figure", figures.FIGURES, ids=lambda f: f.path)
def test_committed_figure_is_not_older_than_its_code(figure):
    problem = figures.stale(figure)
    assert problem is None, problem


def test_every_figure_in_readme_and_docs_that_shows_a_run_is_listed():
    """A new docs/*.png must be added to scripts/figures.py's FIGURES (or this list, if it shows no run)."""
    listed = {f.path for f in figures.FIGURES}
    pngs = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.png")}
    assert pngs <= listed, f"not drawn by scripts/figures.py: {sorted(pngs - listed)}"
    for f in figures.FIGURES:
        assert figures.source_files(f.sources), f"{f.path}: none of its sources exist: {f.sources}"


def test_a_changed_source_makes_the_figure_stale_naming_the_file_and_the_command(tmp_path):
    figure = figures.FIGURES[0]
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    Image.fromarray(np.full((4, 6, 3), 200, np.uint8)).save(root / figure.path)
    for rel in figure.sources:
        if (REPO / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO / rel, root / rel)
    assert "no 'explain-cli-figure' stamp" in figures.stale(figure, root)

    sha, files = figures.code_hash(figure, root)
    figures.write_stamp(root / figure.path, {"sha256": sha, "files": files, "command": figure.command})
    assert figures.stale(figure, root) is None
    with Image.open(root / figure.path) as im:  # still a valid PNG with the same pixels
        assert np.asarray(im.convert("RGB"))[0, 0].tolist() == [200, 200, 200]

    drawing = next(s for s in figure.sources if s.endswith(".py") and (root / s).is_file() and "scripts" not in s)
    with open(root / drawing, "a") as fh:
        fh.write("\n# a change to the drawing code\n")
    problem = figures.stale(figure, root)
    assert problem is not None
    assert figure.path in problem and drawing in problem and figure.command in problem
    assert f"({drawing} changed since" in problem  # only the changed file is named


def test_restamping_replaces_the_old_stamp(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(png)
    figures.write_stamp(png, {"sha256": "1"})
    figures.write_stamp(png, {"sha256": "2"})
    assert figures.read_stamp(png) == {"sha256": "2"}
    assert png.read_bytes().count(b"explain-cli-figure") == 1
    with Image.open(png) as im:
        im.load()
        assert im.text.get("explain-cli-figure") == '{"sha256": "2"}'
