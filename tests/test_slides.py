"""Slides (explain_cli/slides): synthetic pyramidal TIFFs read through OpenSlide, tiles planned by the
tissue mask, heatmaps stitched from topk.csv; pre-tiled folders, bad slides, kill -9, shards + merge."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import TINY_MODEL, gated_env, importable_module, wait_for_gate
from explain_cli.cli import app
from explain_cli.slides.synthetic import SlideSpec, write_slide

MPP = 0.5
TILE = 64
PLANT = (320, 192, 40)  # x, y, side in level-0 pixels: inside tile (320, 192) of the 64 px grid

#: Class 0 scores how blue-not-red an image is, class 1 the opposite: on tissue (pink) the planted
#: dark-blue square is the strongest evidence for class 0. Linear, so its SHAP values are known
#: (w * (x - background)); the tiny model's gate (conftest.gated_env) is kept for the kill test.
SLIDE_MODEL = TINY_MODEL + textwrap.dedent('''

    class Blueness(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([-1.0, 0.0, 1.0]))

        def forward(self, x):
            score = (x * self.w.view(1, 3, 1, 1)).mean(dim=(1, 2, 3)) * 8
            return torch.stack([score, -score], dim=1)

    def blue(num_classes=2):
        model = Blueness()
        if os.environ.get("TINY_GATE"):
            model.register_forward_pre_hook(_gate(Path(os.environ["TINY_GATE"]), Path(os.environ["TINY_GATE_CSV"])))
        return model
''')

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def spec(seed: int = 0, planted=(PLANT,)) -> SlideSpec:
    """A 640 x 448 slide: one tissue ellipse on the left half, glass on the right."""
    return SlideSpec(640, 448, MPP, 3, seed, tissue=[(200.0, 224.0, 190.0, 200.0)], planted=list(planted))


def project(tmp_path: Path, monkeypatch, slides: dict | None = None, **over) -> Path:
    importable_module(tmp_path, "slidenet", SLIDE_MODEL, monkeypatch)
    (tmp_path / "labels.txt").write_text("tumor\nnormal\n")
    bg = tmp_path / "bg"
    bg.mkdir(exist_ok=True)
    Image.fromarray(np.full((TILE, TILE, 3), (226, 160, 196), np.uint8)).save(bg / "pink.tif")
    Image.fromarray(np.full((TILE, TILE, 3), (226, 160, 196), np.uint8)).save(bg / "pink.png")
    config = {
        "model": {"arch": "python:slidenet:blue", "layer": "input"},
        "labels": "labels.txt",
        "preprocess": {"size": 32, "resize": "stretch"},
        "input": {"dir": "slides", "include": ["*.tif", "*.png"]},
        "slides": slides if slides is not None else {"tile": TILE, "mpp": MPP,
                                                      "tissue": {"min_fraction": 0.5, "thumbnail_mpp": 2}},
        "background": {"dir": "bg", "count": 1},
        "explainer": {"name": "gradient", "nsamples": 8},
        "targets": {"classes": ["tumor"]},
        "output": {"dir": "out", "format": "png", "top_k": 1},
        "batch_size": 64, "device": "cpu", "seed": 0, "workers": 0,
    }
    for key, value in over.items():
        config[key] = value
    (tmp_path / "slides").mkdir(exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def maps(out: Path, slide: str) -> dict[str, np.ndarray]:
    with np.load(out / "slides" / slide / "maps.npz") as data:
        return {k: data[k] for k in data.files}


def test_synthetic_slide_reads_through_openslide_with_its_mpp(tmp_path):
    import openslide

    path = write_slide(tmp_path / "s.tif", spec())
    slide = openslide.OpenSlide(str(path))
    assert slide.level_count == 3
    assert slide.level_dimensions[0] == (640, 448) and slide.level_downsamples[2] == pytest.approx(4.0)
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    region = np.asarray(slide.read_region((PLANT[0] + 5, PLANT[1] + 5), 0, (8, 8)).convert("RGB"))
    assert (region == spec().region(PLANT[0] + 5, PLANT[1] + 5, 8, 8, 1)).all()


def test_plan_skips_glass_and_keeps_tissue(tmp_path):
    from explain_cli.config import SlidesConfig
    from explain_cli.slides.plan import plan_slides

    write_slide(tmp_path / "a.tif", spec())
    cfg = SlidesConfig(tile=TILE, mpp=MPP, tissue={"min_fraction": 0.5, "thumbnail_mpp": 2})
    plans = plan_slides(tmp_path, ["a.tif"], cfg)
    plan = plans.slides["a.tif"]
    assert plan.tiles_total == 10 * 7 and plan.level == 0 and plan.read_size == TILE
    assert 0 < len(plan.tiles) < plan.tiles_total
    assert plan.tiles_no_tissue == plan.tiles_total - len(plan.tiles)
    for x, y in plan.tiles:  # every kept tile's centre region is inside or near the ellipse, none on the far glass
        assert x + TILE / 2 < 200 + 190 + TILE
    assert (PLANT[0] // TILE * TILE, PLANT[1] // TILE * TILE) in plan.tiles
    assert not any(x >= 448 for x, _ in plan.tiles)  # the right third of the slide is glass
    # reading at half the resolution picks level 1 and halves the tile count per side
    half = plan_slides(tmp_path, ["a.tif"], SlidesConfig(tile=TILE, mpp=2 * MPP, tissue={"min_fraction": 0}))
    assert half.slides["a.tif"].level == 1 and half.slides["a.tif"].tiles_total == 5 * 3


def test_planted_feature_lands_in_its_tiles_cells(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch)
    write_slide(tmp_path / "slides" / "a.tif", spec())
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    got = maps(out, "a")
    attribution = got["attribution"][0]
    assert got["classes"].tolist() == ["tumor"] and float(got["cell_px_level0"]) == TILE / 4
    row, col = np.unravel_index(np.nanargmax(attribution), attribution.shape)
    cell = TILE / 4
    assert PLANT[1] <= (row + 0.5) * cell < PLANT[1] + PLANT[2] + cell
    assert PLANT[0] <= (col + 0.5) * cell < PLANT[0] + PLANT[2] + cell
    assert np.isnan(attribution[:, -8:]).all()  # glass: no tile, no value
    table = rows(out / "topk.csv")
    assert {r["slide"] for r in table} == {"a"} and all(r["mpp"] == "0.5" for r in table)
    for r in table:  # a tile's cells add up to its map's total (pooling keeps additivity)
        assert sum(float(v) for v in r["cells"].split()) == pytest.approx(float(r["shap_sum"]), rel=1e-3, abs=1e-4)
    index = json.loads((out / "slides" / "index.json").read_text())["slides"][0]
    assert index["tiles_explained"] == len(table) == index["tiles_kept"]
    assert index["top_by_attribution"]["tumor"][0]["image"] == f"a.tif/{PLANT[0] // TILE * TILE}_{PLANT[1] // TILE * TILE}"
    for name in ("heatmap-tumor.png", "probability-tumor.png", "thumbnail.png", "tissue.png"):
        assert Image.open(out / "slides" / "a" / name).size[0] > 100
    assert not (out / "overlays").exists()  # per-tile overlays only when asked


def test_tiles_named_with_coordinates_give_the_slides_heatmap(tmp_path, monkeypatch):
    slide_dir = tmp_path / "one"
    slide_dir.mkdir()
    config = project(slide_dir, monkeypatch)
    write_slide(slide_dir / "slides" / "slide01.tif", spec())
    assert invoke("run", config, "--no-progress").exit_code == 0
    from_slide = maps(slide_dir / "out", "slide01")
    tiles_dir = tmp_path / "two"
    tiles_dir.mkdir()
    config = project(tiles_dir, monkeypatch, slides={"from_names": r"(?P<slide>[^/]+)/tile_x(?P<x>\d+)_y(?P<y>\d+)",
                                                     "mpp": MPP, "tile": TILE})
    import openslide

    slide = openslide.OpenSlide(str(slide_dir / "slides" / "slide01.tif"))
    for r in rows(slide_dir / "out" / "topk.csv"):
        x, y = int(r["x"]), int(r["y"])
        target = tiles_dir / "slides" / "slide01" / f"tile_x{x}_y{y}+01.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        slide.read_region((x, y), 0, (TILE, TILE)).convert("RGB").save(target)
    (tiles_dir / "slides" / "notes.png").write_bytes((tiles_dir / "bg" / "pink.png").read_bytes())  # matches no name
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    from_tiles = maps(tiles_dir / "out", "slide01")
    # a folder of tiles knows the slide only up to its last tile: the same grid, cut there
    _, h, w = from_tiles["attribution"].shape
    assert np.isnan(from_slide["attribution"][:, h:]).all() and np.isnan(from_slide["attribution"][:, :, w:]).all()
    np.testing.assert_allclose(from_tiles["attribution"], from_slide["attribution"][:, :h, :w], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(from_tiles["probability"], from_slide["probability"][:, :h, :w], rtol=1e-5, atol=1e-6)
    assert np.isfinite(from_tiles["attribution"]).sum() > 100
    run = json.loads((tiles_dir / "out" / "run.json").read_text())
    assert run["counts"]["selected"] == len(rows(slide_dir / "out" / "topk.csv"))
    assert run["counts"]["not_matched"] == 1  # notes.png


def test_from_names_matching_nothing_exits_2_naming_the_key(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch, slides={"from_names": r"(?P<slide>[^/]+)/tile_x(?P<x>\d+)_y(?P<y>\d+)"})
    Image.new("RGB", (TILE, TILE), (200, 100, 150)).save(tmp_path / "slides" / "photo.png")
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 2
    assert "slides.from_names" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "topk.csv").exists()


@pytest.mark.parametrize("slides, key", [
    ({"tile": 64, "stride": 128}, "stride"),
    ({"from_names": "(?P<slide>x)"}, "from_names"),
    ({"from_names": "(unclosed"}, "from_names"),
    ({"mpp": 0.5, "level": 1}, "level"),
])
def test_bad_slides_section_exits_2(tmp_path, monkeypatch, slides, key):
    config = project(tmp_path, monkeypatch, slides=slides)
    result = invoke("validate", config)
    assert result.exit_code == 2 and key in result.output and "Traceback" not in result.output


def test_slide_without_mpp_exits_2_naming_slides_level(tmp_path, monkeypatch):
    import tifffile

    config = project(tmp_path, monkeypatch)
    with tifffile.TiffWriter(tmp_path / "slides" / "nompp.tif") as tw:  # tiled, no resolution tags
        tw.write(spec().region(0, 0, 640, 448, 1), tile=(256, 256), photometric="rgb")
    result = invoke("validate", config)
    assert result.exit_code == 2 and "slides.level" in result.output
    # with a level instead, it runs
    result = invoke("run", config, "--no-progress", "--set", "slides.mpp=null", "--set", "slides.level=0")
    assert result.exit_code == 0, result.output


def test_corrupt_slide_is_an_errors_row_and_the_run_goes_on(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch)
    write_slide(tmp_path / "slides" / "good.tif", spec())
    good = (tmp_path / "slides" / "good.tif").read_bytes()
    (tmp_path / "slides" / "truncated.tif").write_bytes(good[: len(good) // 3])
    (tmp_path / "slides" / "text.tif").write_text("not a slide")
    write_slide(tmp_path / "slides" / "blank.tif", SlideSpec(640, 448, MPP, 3, 0))  # glass only
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 3, result.output
    out = tmp_path / "out"
    errors = {r["image"]: r["error"] for r in rows(out / "errors.csv")}
    assert "text.tif" in errors
    assert any(name.startswith("truncated.tif") for name in errors), errors  # the slide, or its unreadable tiles
    assert "no tile with" in result.output  # the blank slide: a warning
    index = {s["id"]: s for s in json.loads((out / "slides" / "index.json").read_text())["slides"]}
    assert index["good"]["tiles_explained"] > 0 and "warning" in index["blank"]
    assert (out / "slides" / "good" / "heatmap-tumor.png").exists()


def test_kill_9_mid_slide_then_rerun_explains_each_tile_once(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch, explainer={"name": "gradient", "nsamples": 8}, batch_size=8)
    write_slide(tmp_path / "slides" / "a.tif", spec())
    out = tmp_path / "out"
    env, hold = gated_env(tmp_path, out / "topk.csv")
    proc = subprocess.Popen([sys.executable, "-m", "explain_cli", "run", str(config), "--no-progress"],
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_gate(proc, hold)
        proc.kill()
        proc.wait(timeout=60)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    before = rows(out / "topk.csv")
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    after = rows(out / "topk.csv")
    planned = json.loads((out / "slides" / "a" / "slide.json").read_text())["tiles_kept"]
    assert 0 < len(before) < planned
    assert len(after) == len({r["image"] for r in after}) == planned
    assert f"already done {len(before)}" in result.output or f"{len(before)} of" in result.output


def test_two_shards_over_three_slides_merge_to_the_unsharded_heatmaps(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch)
    for i in range(3):
        write_slide(tmp_path / "slides" / f"s{i}.tif", spec(seed=i, planted=[(64 * (i + 1), 128, 40)]))
    assert invoke("run", config, "--no-progress", "--output", tmp_path / "whole").exit_code == 0
    for i in range(2):
        result = invoke("run", config, "--no-progress", "--output", tmp_path / "sharded", "--shard", f"{i}/2")
        assert result.exit_code == 0, result.output
        assert not (tmp_path / "sharded" / "slides" / "s0" / "maps.npz").exists()  # a shard draws no heatmap
    result = invoke("merge", tmp_path / "sharded")
    assert result.exit_code == 0, result.output
    for i in range(3):
        whole, merged = maps(tmp_path / "whole", f"s{i}"), maps(tmp_path / "sharded", f"s{i}")
        np.testing.assert_allclose(merged["attribution"], whole["attribution"], rtol=1e-5, atol=1e-6)
        assert (tmp_path / "sharded" / "slides" / f"s{i}" / "heatmap-tumor.png").exists()


def test_pool_cells_sums_blocks_of_any_size():
    from explain_cli.slides.source import pool_cells

    values = np.arange(2 * 3 * 10 * 10, dtype=np.float32).reshape(2, 3, 10, 10)
    cells = pool_cells(values, 4)
    assert cells.shape == (2, 4, 4)
    np.testing.assert_allclose(cells.sum(axis=(1, 2)), values.sum(axis=(1, 2, 3)))
    rows_of = (np.arange(10) * 4) // 10
    want = values[0].sum(0)[rows_of == 1][:, rows_of == 2].sum()
    assert cells[0, 1, 2] == pytest.approx(want)


def test_heatmap_tiff_is_pyramidal_with_the_cell_size(tmp_path):
    import tifffile

    from explain_cli.slides.heatmap import write_tiff

    grid = np.random.default_rng(0).normal(size=(600, 700)).astype(np.float32)
    write_tiff(tmp_path / "h.tiff", grid, {"cell_um": 8.0})
    with tifffile.TiffFile(tmp_path / "h.tiff") as tif:
        assert len(tif.pages) >= 2 and tif.pages[0].shape[:2] == (600, 700)
        x_res = tif.pages[0].tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / 8.0, rel=1e-3)


PLANTED_TILE = f"a.tif/{PLANT[0] // TILE * TILE}_{PLANT[1] // TILE * TILE}"


@pytest.mark.parametrize("explainer", [
    {"name": "deep"},
    {"name": "partition", "mask": 128, "max_evals": 200},  # a grey fill: a blur keeps the linear model's mean
    {"name": "kernel", "segments": {"n_segments": 16}, "nsamples": 200, "fill": "mean"},
])
def test_every_explainer_finds_the_planted_tile(tmp_path, monkeypatch, explainer):
    config = project(tmp_path, monkeypatch, explainer=explainer)
    write_slide(tmp_path / "slides" / "a.tif", spec())
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "slides" / "index.json").read_text())["slides"][0]
    assert index["tiles_explained"] == index["tiles_kept"] > 10
    assert index["top_by_attribution"]["tumor"][0]["image"] == PLANTED_TILE
    assert (tmp_path / "out" / "slides" / "a" / "heatmap-tumor.png").exists()


def test_amortized_trains_on_the_tiles_and_draws_the_heatmap(tmp_path, monkeypatch):
    explainer = {"name": "amortized", "checkpoint": "explainer.pt", "segments": {"grid": 4}, "fill": "mean",
                 "train": {"epochs": 2, "pairs": 4, "images_per_step": 8, "width": 8, "augment": False,
                           "holdout": 0.2, "validate_nsamples": 50, "validate_images": 1}}
    config = project(tmp_path, monkeypatch, explainer=explainer)
    write_slide(tmp_path / "slides" / "a.tif", spec())
    result = invoke("train", config, "--output", tmp_path / "explainer.pt")
    assert result.exit_code == 0, result.output
    assert "images for training" in result.output or (tmp_path / "explainer.pt").exists()
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "out" / "slides" / "index.json").read_text())["slides"][0]
    assert index["tiles_explained"] == index["tiles_kept"] > 10
    got = maps(tmp_path / "out", "a")
    assert np.isfinite(got["attribution"]).sum() == index["tiles_kept"] * 16


def test_tile_overlays_when_asked_and_the_report_links_them(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch)
    write_slide(tmp_path / "slides" / "a.tif", spec())
    result = invoke("run", config, "--no-progress", "--set", "slides.overlays=true")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    overlays = sorted(p.relative_to(out / "overlays").as_posix() for p in (out / "overlays").rglob("*.png"))
    assert len(overlays) == len(rows(out / "topk.csv"))
    assert f"{PLANTED_TILE}.png" in overlays
    assert f"overlays/{PLANTED_TILE}.png" in (out / "report.html").read_text()


def test_a_rerun_with_nothing_new_redraws_nothing(tmp_path, monkeypatch):
    config = project(tmp_path, monkeypatch)
    write_slide(tmp_path / "slides" / "a.tif", spec())
    write_slide(tmp_path / "slides" / "b.tif", spec(seed=1))
    assert invoke("run", config, "--no-progress", "--limit", "5").exit_code == 0  # a's first tiles only
    out = tmp_path / "out"
    heat_a, heat_b = out / "slides" / "a" / "heatmap-tumor.png", out / "slides" / "b" / "maps.npz"
    assert heat_a.exists() and heat_b.exists()  # b: never drawn before, so drawn (empty)
    first_b = heat_b.stat().st_mtime_ns
    assert invoke("run", config, "--no-progress").exit_code == 0  # the rest: both slides have new tiles
    assert heat_b.stat().st_mtime_ns != first_b
    before = {p: p.stat().st_mtime_ns for p in (out / "slides").rglob("*.png")}
    result = invoke("run", config, "--no-progress")
    assert result.exit_code == 0 and "already done" in result.output
    assert {p: p.stat().st_mtime_ns for p in (out / "slides").rglob("*.png")} == before
    index = {s["id"]: s for s in json.loads((out / "slides" / "index.json").read_text())["slides"]}
    assert index["a"]["tiles_explained"] == index["a"]["tiles_kept"] and index["b"]["tiles_explained"] > 0
