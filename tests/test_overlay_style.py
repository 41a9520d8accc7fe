"""Overlay readability: output.style (the base image under the map) and the caption line."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

import numpy as np
import yaml
from PIL import Image
from typer.testing import CliRunner

from explain_cli.cli import app
from explain_cli.render import CAPTION_PT, STYLES, compose_panels, overlay_bytes, text_width_pt

SVG = "{http://www.w3.org/2000/svg}"


def _zero(size: int = 20) -> np.ndarray:
    return np.zeros((1, 3, size, size), dtype=np.float32)


def test_default_base_image_is_more_visible_than_shaps():
    pixels = np.full((20, 20, 3), 255, dtype=np.uint8)
    pixels[10:] = 0  # a dark half: where the map is zero the panel shows the faded image
    default, _ = compose_panels(pixels, _zero())
    shap_look, _ = compose_panels(pixels, _zero(), style="shap")
    assert STYLES["gray"].opacity == 0.45 and STYLES["shap"].opacity == 0.15
    assert tuple(default[1][15, 5]) == (140, 140, 140)  # black at 45 %: 255 * 0.55
    assert tuple(shap_look[1][15, 5]) == (217, 217, 217)  # black at 15 %, as shap.image_plot
    assert tuple(default[1][5, 5]) == (255, 255, 255)


def test_default_contrast_stretch_ignores_a_glint():
    rng = np.random.default_rng(0)
    pixels = rng.integers(100, 121, (40, 40, 3), dtype=np.uint8)
    pixels[0, 0] = 255  # one glint: min-max (shap) squeezes the rest into a narrow band
    default, _ = compose_panels(pixels, _zero(40))
    shap_look, _ = compose_panels(pixels, _zero(40), style="shap")
    spread = lambda panels: int(np.ptp(panels[1][1:, 1:, 0].astype(int)))  # noqa: E731 - without the glint
    assert spread(default) > 3 * spread(shap_look)


def test_heat_style_shows_the_colour_image():
    pixels = np.zeros((20, 20, 3), dtype=np.uint8)
    pixels[...] = (200, 30, 30)
    panels, _ = compose_panels(pixels, _zero(), style="heat")
    r, g, b = (int(v) for v in panels[1][5, 5])
    assert (r, g, b) == (211, 75, 75)  # 80 % of the colour over white
    values = _zero()
    values[0, 0] = 5.0  # a strong positive map is red whatever the base
    panels, _ = compose_panels(pixels, values, style="heat")
    assert panels[1][5, 5, 0] > 200 and panels[1][5, 5, 1] < 40


def test_caption_in_svg_and_png_deterministic_and_cut_to_width():
    pixels = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    values = np.random.default_rng(2).normal(size=(2, 3, 24, 24)).astype(np.float32)
    caption = "cats/tabby.png  \u00b7  gradient explainer  \u00b7  layer blocks.3"
    svg = overlay_bytes(pixels, values, ["a", "b"], caption=caption)
    assert svg == overlay_bytes(pixels, values, ["a", "b"], caption=caption)  # byte-identical
    root = ET.fromstring(svg)
    texts = {t.get("id"): t.text for t in root.iter(f"{SVG}text")}
    assert texts["caption"] == caption
    assert "caption" not in {t.get("id") for t in ET.fromstring(overlay_bytes(pixels, values, ["a", "b"])).iter(f"{SVG}text")}
    with_caption = Image.open(io.BytesIO(overlay_bytes(pixels, values, ["a", "b"], fmt="png", caption=caption)))
    without = Image.open(io.BytesIO(overlay_bytes(pixels, values, ["a", "b"], fmt="png")))
    assert with_caption.height > without.height and with_caption.width == without.width
    # the caption's pixels are drawn: the extra strip is not blank
    strip = np.asarray(with_caption)[without.height - 5:]
    assert (strip < 200).any()
    long = "x/" * 300 + "image.png"
    cut = {t.get("id"): t.text for t in ET.fromstring(overlay_bytes(pixels, values[:1], ["a"], caption=long)).iter(f"{SVG}text")}
    assert cut["caption"].endswith("\u2026") and text_width_pt(cut["caption"], CAPTION_PT) < 2 * 158


def test_run_writes_caption_and_style(tiny_project):
    runner = CliRunner()
    cfg = tiny_project / "config.yaml"
    assert runner.invoke(app, ["run", str(cfg), "--no-progress", "--limit", "1"]).exit_code == 0
    svg = (tiny_project / "out" / "overlays" / "a" / "one.png.svg").read_text()
    texts = {t.get("id"): t.text for t in ET.fromstring(svg).iter(f"{SVG}text")}
    # then the maps' trust numbers (tests/test_overlay_trust.py)
    assert texts["caption"].startswith("a/one.png  \u00b7  gradient explainer  \u00b7  layer input  \u00b7  stability ")
    data = yaml.safe_load(cfg.read_text())
    data["output"].update(style="heat", caption=False, dir="heat")
    (tiny_project / "heat.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["run", str(tiny_project / "heat.yaml"), "--no-progress", "--limit", "1"])
    assert result.exit_code == 0, result.output
    heat = (tiny_project / "heat" / "overlays" / "a" / "one.png.svg").read_text()
    assert 'id="caption"' not in heat and heat != svg
    result = runner.invoke(app, ["validate", str(cfg), "--set", "output.style=hot"])
    assert result.exit_code == 2 and "output.style" in result.output and "heat" in result.output
