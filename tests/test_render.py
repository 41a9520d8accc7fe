"""Overlay rendering: shap's look (colours, layout, scale), any k, layers, segments, hostile and
long titles, byte-identical files, quiet without a writable HOME.

Images are tiny (16-32 px) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import base64
import io
import os
import random
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from explain_cli.render import (MIN_LIMIT, PANEL_INCHES, RED_TRANSPARENT_BLUE_LUT, channel_map,
                                colorbar_ticks, colormap, compose_panels, fit_title, format_title,
                                layout, overlay_bytes, render_overlay, segment_fill, symmetric_limit,
                                text_width_pt)

REPO = Path(__file__).resolve().parents[1]
SVG = "{http://www.w3.org/2000/svg}"
XLINK = "{http://www.w3.org/1999/xlink}"
TRICKY = ["cat & dog", "<bird>", "fish $x$", "50% off_\\path", 'say "hi"', "a\\$b $5", "кот ü",
          "]]> <!-- x --> <![CDATA[", "it's"]
BLUE, RED = (30, 136, 229), (255, 13, 87)


def _image(size: int = 16, value: int | None = None, seed: int = 0) -> np.ndarray:
    if value is not None:
        return np.full((size, size, 3), value, dtype=np.uint8)
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _values(k: int, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(k, channels, size, size)).astype(np.float32)


def _svg_root(path: Path) -> ET.Element:
    return ET.parse(path).getroot()  # raises if the SVG is not well-formed XML


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def _svg_panels(root: ET.Element) -> dict[str, np.ndarray]:
    """The embedded panel images of an SVG, decoded, by id."""
    out = {}
    for e in root.iter(f"{SVG}image"):
        href = e.get(f"{XLINK}href")
        assert href.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))) as im:
            out[e.get("id")] = np.asarray(im.convert("RGB"))
    return out


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        return np.asarray(im)


def _box(lay, i: int, dpi: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of panel i in a PNG at dpi, as the renderer rounds it."""
    s = dpi / 72.0
    x, y, w, h = lay.panels[i]
    return round(x * s), round(y * s), round((x + w) * s), round((y + h) * s)


# --- titles -----------------------------------------------------------------------------------

def test_format_title_is_literal_and_cleaned():
    assert format_title("Egyptian cat", 0.9134) == "Egyptian cat: p = 0.91"
    assert format_title("fish $x$", 0.5) == "fish $x$: p = 0.50"  # no mathtext: nothing escaped
    assert format_title("50% off_\\path", 0.5) == "50% off_\\path: p = 0.50"
    # characters XML cannot hold, lone surrogates and line breaks never reach the SVG
    assert format_title("a\x01b\nc\r\n\td", 0.5) == "a\ufffdb c d: p = 0.50"
    assert format_title("x\ud800y\udfff", 0.5) == "x\ufffdy\ufffd: p = 0.50"
    # the image's own label, and a contrast (targets)
    assert format_title("normal", 0.48, label=True) == "normal (label): p = 0.48"
    assert format_title("Egyptian cat", 0.37, contrast="tiger\ncat") == "Egyptian cat rather than tiger cat: p = 0.37"


def test_long_title_keeps_its_probability_when_cut():
    title = format_title("a very long class name " * 8, 0.25, contrast="another long class name " * 4)
    text, size = fit_title(title, 120.0)
    assert text.endswith("\u2026: p = 0.25") and size == 6.0


def test_svg_parses_and_holds_class_names_literally(tmp_path):
    path = tmp_path / "deep" / "er" / "x.svg"
    titles = [format_title(n, 0.5) for n in TRICKY]
    render_overlay(_image(), _values(len(TRICKY)), titles, path, fmt="svg")
    raw = path.read_text(encoding="utf-8")
    texts = _texts(_svg_root(path))
    for name in TRICKY:
        assert f"{name}: p = 0.50" in texts, (name, texts)  # one <text> each, drawn literally
    assert "SHAP value" in texts
    assert "cat &amp; dog" in raw and "&lt;bird&gt;" in raw and "fish $x$" in raw


def test_svg_and_png_are_byte_identical_across_runs_and_processes(tmp_path):
    code = ("import sys, numpy as np; from pathlib import Path; "
            "from explain_cli.render import render_overlay; "
            "rng = np.random.default_rng(0); "
            "px = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8); "
            "v = np.random.default_rng(0).normal(size=(2, 3, 16, 16)).astype(np.float32); "
            "[render_overlay(px, v, ['a (0.50)', 'b (0.20)'], Path(sys.argv[1]) / f'sub.{f}', fmt=f) "
            "for f in ('svg', 'png')]")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONHASHSEED": "123"})
    args = (_image(), _values(2), ["a (0.50)", "b (0.20)"])
    for fmt in ("svg", "png"):
        render_overlay(*args, tmp_path / f"1.{fmt}", fmt=fmt)
        render_overlay(*args, tmp_path / f"2.{fmt}", fmt=fmt)
        first = (tmp_path / f"1.{fmt}").read_bytes()
        assert first == (tmp_path / f"2.{fmt}").read_bytes() == (tmp_path / f"sub.{fmt}").read_bytes()
        assert b"Date" not in first and b"tIME" not in first


# --- layout: any k ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_plus_one_panels_in_order(tmp_path, k):
    titles = [format_title(f"class {i}", 1 / (i + 2)) for i in range(k)]
    values = _values(k)
    path = tmp_path / f"k{k}.svg"
    render_overlay(_image(), values, titles, path)
    root = _svg_root(path)
    panels = _svg_panels(root)
    assert list(panels) == [f"panel-{i}" for i in range(k + 1)]  # image first, then rank order
    np.testing.assert_array_equal(panels["panel-0"], _image())
    expected, _ = compose_panels(_image(), values)
    for i in range(1, k + 1):
        np.testing.assert_array_equal(panels[f"panel-{i}"], expected[i])
    assert [t for t in _texts(root) if t.startswith("class ")] == titles
    # titles over their panels, left to right
    xs = {e.get("id"): float(e.get("x")) for e in root.iter(f"{SVG}image")}
    title_xs = [float(t.get("x")) for t in root.iter(f"{SVG}text") if (t.get("id") or "").startswith("title-")]
    assert title_xs == sorted(title_xs) and all(x > xs[f"panel-{i + 1}"] for i, x in enumerate(title_xs))

    png = tmp_path / f"k{k}.png"
    render_overlay(_image(), values, titles, png, fmt="png", dpi=40)
    assert _png(png).shape[1] == round(((k + 1) * PANEL_INCHES + 0.08) * 40)


def test_titles_must_match_classes(tmp_path):
    with pytest.raises(ValueError, match="titles"):
        render_overlay(_image(), _values(3), ["a", "b"], tmp_path / "x.svg")


def test_png_valid_grows_with_k_and_scales_with_dpi(tmp_path):
    sizes = {}
    for k, dpi in ((1, 50), (3, 50), (3, 100)):
        path = tmp_path / f"k{k}-{dpi}.png"
        render_overlay(_image(), _values(k), [f"c{i}" for i in range(k)], path, fmt="png", dpi=dpi)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            sizes[k, dpi] = im.size
            assert im.info["dpi"] == pytest.approx((dpi, dpi), abs=0.05)  # whole pixels per metre
    (w1, h1), (w3, h3), (w3b, h3b) = sizes[1, 50], sizes[3, 50], sizes[3, 100]
    assert h1 == h3 and 60 < h1 < 400
    assert abs((w3 - w1) - 2 * PANEL_INCHES * 50) <= 2  # two more 2.2-inch panels at 50 dpi
    assert abs(w3b - 2 * w3) <= 2 and abs(h3b - 2 * h3) <= 2


def test_svg_size_follows_dpi():
    roots = [ET.fromstring(overlay_bytes(_image(), _values(2), ["a", "b"], fmt="svg", dpi=d))
             for d in (72, 144)]
    (w72, h72), (w144, h144) = [(float(r.get("width")), float(r.get("height"))) for r in roots]
    assert w144 == pytest.approx(2 * w72, abs=0.02) and h144 == pytest.approx(2 * h72, abs=0.02)
    assert roots[0].get("viewBox") == roots[1].get("viewBox")  # same drawing, other nominal size


def test_unknown_format_rejected(tmp_path):
    with pytest.raises(ValueError, match="format"):
        render_overlay(_image(), _values(1), ["a"], tmp_path / "x.pdf", fmt="pdf")
    assert not (tmp_path / "x.pdf").exists()


# --- the look: shap's colours over a faded image ----------------------------------------------

def test_colormap_is_shaps_red_transparent_blue():
    from matplotlib.colors import Normalize
    from shap.plots.colors import red_transparent_blue

    np.testing.assert_allclose(RED_TRANSPARENT_BLUE_LUT, red_transparent_blue(np.arange(256)), atol=1e-12)
    values = np.random.default_rng(2).normal(scale=2.0, size=(40, 40))
    values[0, :5] = [np.nan, 7.0, -7.0, 1.5, -1.5]  # NaN, beyond the limit, exactly at it
    for limit in (1.5, 0.01):
        expected = red_transparent_blue(Normalize(-limit, limit)(values))
        np.testing.assert_allclose(colormap(values, limit), expected, atol=1e-7)


def test_png_pixels_red_blue_and_grey(tmp_path):
    # left third strongly positive, middle third zero, right third strongly negative
    size = 30
    values = np.zeros((1, 3, size, size), dtype=np.float32)
    values[0, 0, :, :10] = 5.0
    values[0, 1, :, 20:] = -5.0
    pixels = _image(size, value=90)
    pixels[: size // 2] = 200  # the zero column shows the faded image: two gray levels
    path = tmp_path / "look.png"
    render_overlay(pixels, values, ["pos-neg (0.99)"], path, fmt="png", dpi=100, style="shap")
    img = _png(path).astype(int)
    x0, y0, x1, y1 = _box(layout(1, (size, size)), 1, 100)
    col = lambda f: x0 + int((x1 - x0) * f)  # noqa: E731
    row = lambda f: y0 + int((y1 - y0) * f)  # noqa: E731
    assert tuple(img[row(0.7), col(1 / 6)]) == RED  # full red at the limit
    assert tuple(img[row(0.7), col(5 / 6)]) == BLUE
    light, dark = img[row(0.25), col(0.5)], img[row(0.75), col(0.5)]
    assert light[0] == light[1] == light[2] and dark[0] == dark[1] == dark[2]  # transparent: gray
    assert 255 >= light[0] > dark[0] >= 216  # the image faded to 15% over white
    # the image panel is the image itself
    ix0, iy0, ix1, iy1 = _box(layout(1, (size, size)), 0, 100)
    assert tuple(img[iy0 + 5, ix0 + 5]) == (200, 200, 200)
    assert tuple(img[iy1 - 5, ix0 + 5]) == (90, 90, 90)


def test_panels_match_shap_image_plot():
    """output.style shap: shap.image_plot of the same maps: same panel count and order, same titles, the same
    colour limit, and each of our panels is shap's colour map over shap's faded gray image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    pixels, values = _image(24, seed=3), _values(2, size=24, seed=3)
    titles = ["a (0.60)", "b (0.30)"]
    maps = channel_map(values, (24, 24))
    shap.image_plot([maps[i][None, ..., None] for i in range(2)], pixels[None] / 255.0,
                    np.array([titles]), show=False)
    fig = plt.gcf()
    try:
        assert len(fig.axes) == 4  # image, one panel per class, the horizontal colour bar
        assert [ax.get_title() for ax in fig.axes[:3]] == ["", *titles]
        assert fig.axes[3].get_xlabel() == "SHAP value"
        ours, limit = compose_panels(pixels, values, style="shap")  # shap's exact look
        assert len(ours) == 3
        np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), pixels / 255.0)
        for i in (1, 2):
            gray_im, heat_im = fig.axes[i].images
            assert heat_im.get_clim() == pytest.approx((-limit, limit))
            gray = gray_im.cmap(gray_im.norm(gray_im.get_array()))[..., 0]  # shap's gray, stretched
            rgba = heat_im.cmap(heat_im.norm(heat_im.get_array()))
            faded = 1 - 0.15 + 0.15 * gray
            expected = rgba[..., :3] * rgba[..., 3:] + faded[..., None] * (1 - rgba[..., 3:])
            assert np.abs(ours[i].astype(float) - expected * 255).max() <= 1.0
    finally:
        plt.close(fig)


def test_colour_scale_shared_and_symmetric():
    # class 0 = +1 everywhere, class 1 = -2 everywhere: the shared limit is 2, so class 1 gets
    # the full blue of the colour map and class 0 only a half-transparent red.
    values = np.zeros((2, 3, 16, 16), dtype=np.float32)
    values[0, 0] = 1.0
    values[1, 2] = -2.0
    panels, limit = compose_panels(_image(value=128), values)
    assert limit == 2.0
    np.testing.assert_array_equal(np.unique(panels[2].reshape(-1, 3), axis=0), [BLUE])
    red = np.unique(panels[1].reshape(-1, 3), axis=0)
    assert len(red) == 1
    r, g, b = red[0].astype(int)
    assert r > g and r > b  # red-ish...
    assert g > 13 + 60  # ...but far from the full red (255, 13, 87): half the scale only
    assert colorbar_ticks(2.0) == [-2.0, -1.0, 0.0, 1.0, 2.0]  # symmetric around 0


def test_colorbar_ticks_follow_matplotlib_locator():
    from matplotlib.ticker import MaxNLocator

    locator = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10])
    for limit in (2.0, 0.0723, 1e-8, 3.3e-5, 0.5, 17.0, 123456.0, 0.999, 1.0):
        expected = [t for t in locator.tick_values(-limit, limit) if -limit * 1.000001 <= t <= limit * 1.000001]
        assert colorbar_ticks(limit) == pytest.approx(expected, rel=1e-9, abs=limit * 1e-9), limit
        assert 0.0 in colorbar_ticks(limit)


def test_svg_colour_bar_and_ticks(tmp_path):
    values = np.zeros((1, 3, 16, 16), dtype=np.float32)
    values[0, 0, :8] = 0.5
    values[0, 0, 8:] = -0.5
    root = ET.fromstring(overlay_bytes(_image(), values, ["a"], fmt="svg"))
    stops = [s.get("stop-color") for s in root.iter(f"{SVG}stop")]
    assert stops == ["#1e88e5", "#ffffff", "#ff0d57"]  # shap's blue, transparent, red
    labels = [t for t in _texts(root) if t not in ("a", "SHAP value")]
    assert labels == ["\u22120.4", "\u22120.2", "0", "0.2", "0.4"]  # limit 0.5, step 0.2
    ticks = [float(e.get("x1")) for e in root.iter(f"{SVG}line")]
    bar = next(e for e in root.iter(f"{SVG}rect") if e.get("id") == "colorbar")
    x0, w = float(bar.get("x")), float(bar.get("width"))
    assert ticks == pytest.approx([x0 + w * f for f in (0.1, 0.3, 0.5, 0.7, 0.9)], abs=0.01)


def test_all_zero_and_nan_attributions_render(tmp_path):
    render_overlay(_image(), np.zeros((3, 3, 16, 16)), ["a", "b", "c"], tmp_path / "z.svg")
    render_overlay(_image(), np.full((1, 3, 16, 16), np.nan), ["a"], tmp_path / "n.png", fmt="png")
    _svg_root(tmp_path / "z.svg")
    # zero (and NaN) attribution is the transparent middle: only the faded (constant) image is left
    for values in (np.zeros((1, 3, 16, 16)), np.full((1, 3, 16, 16), np.nan)):
        panels, _ = compose_panels(_image(value=0), values)
        assert len(np.unique(panels[1].reshape(-1, 3), axis=0)) == 1


# --- channel_map: sum over channels, nearest upsampling ---------------------------------------

def test_channel_map_pixel_space_is_channel_sum():
    v = _values(2)
    np.testing.assert_allclose(channel_map(v, (16, 16)), v.sum(axis=1), rtol=1e-6)
    assert channel_map(v[0], (16, 16)).shape == (16, 16)


def test_channel_map_upsamples_layer_hot_spot_to_its_quadrant():
    v = np.zeros((16, 7, 7), dtype=np.float32)  # a layer: 16 channels at 7x7 for a 28x28 image
    v[3, 1, 5] = 2.0
    v[7, 1, 5] = 1.0
    m = channel_map(v, (28, 28))
    assert m.shape == (28, 28)
    np.testing.assert_array_equal(m[4:8, 20:24], 3.0)  # cell (1, 5) covers rows 4-7, cols 20-23
    assert np.count_nonzero(m) == 16  # nothing leaks (nearest, not bilinear)
    assert m[:14, 14:].sum() == 48.0  # top-right quadrant
    assert m.sum() == pytest.approx(v.sum() * 16)


def test_channel_map_non_integer_factor_uses_pixel_centres():
    v = np.zeros((1, 2, 3, 3), dtype=np.float32)
    v[0, 0, 1, 1] = 1.0
    v[0, 1, 1, 1] = 4.0
    m = channel_map(v, (7, 7))
    assert m.shape == (1, 7, 7)
    expected = np.zeros((7, 7))
    expected[2:5, 2:5] = 5.0  # pixel centres 2.5..4.5 of 7 fall into the middle third
    np.testing.assert_array_equal(m[0], expected)


def test_layer_sized_values_render_as_blocks(tmp_path):
    values = np.zeros((1, 16, 7, 7), dtype=np.float32)
    values[0, 3, 1, 5] = 2.0
    panels, _ = compose_panels(_image(28, value=50), values)
    red = np.all(panels[1] == RED, axis=-1)
    assert red[4:8, 20:24].all() and red.sum() == 16  # one layer cell = one 4x4 block
    path = tmp_path / "layer.png"
    render_overlay(_image(28), _values(2, size=7, channels=16), ["a", "b"], path, fmt="png", dpi=40)
    assert path.stat().st_size > 0


# --- symmetric, shared colour scale -----------------------------------------------------------

def test_symmetric_limit_is_shaps_percentile_over_all_panels():
    maps = np.random.default_rng(1).normal(size=(3, 20, 20))
    maps[2, 0, 0] = 1000.0  # one outlier: the 99.9th percentile ignores most of it
    expected = np.percentile(np.abs(maps).ravel(), 99.9)
    assert symmetric_limit(maps) == pytest.approx(expected)
    assert symmetric_limit(maps) < 1000.0
    assert symmetric_limit(maps) > symmetric_limit(maps[:1])  # shared, not the quietest panel's


def test_symmetric_limit_zero_and_sparse_maps():
    assert symmetric_limit(np.zeros((2, 8, 8))) == MIN_LIMIT > 0
    sparse = np.zeros((2, 40, 40))
    sparse[0, 3, 3] = -0.5  # fewer than 0.1% non-zero: the percentile is 0, fall back to the max
    assert symmetric_limit(sparse) == 0.5
    assert symmetric_limit(np.full((4, 4), np.nan)) == MIN_LIMIT


# --- segments (kernel explainer) --------------------------------------------------------------

def _quadrants(size: int = 16) -> np.ndarray:
    seg = np.zeros((size, size), dtype=np.int64)
    seg[: size // 2, size // 2:] = 1
    seg[size // 2:, : size // 2] = 7  # labels need not be contiguous
    seg[size // 2:, size // 2:] = 3
    return seg


def test_segment_fill_is_constant_per_segment():
    seg = _quadrants()
    maps = channel_map(_values(2), (16, 16))
    filled = segment_fill(maps, seg)
    for j in range(2):
        for label in np.unique(seg):
            inside = filled[j][seg == label]
            np.testing.assert_allclose(inside, inside[0])
            assert inside[0] == pytest.approx(maps[j][seg == label].mean(), rel=1e-5)


def test_segments_panel_one_colour_per_segment_with_boundaries():
    seg = _quadrants()
    values = np.zeros((1, 1, 16, 16), dtype=np.float32)
    values[0, 0] = np.where(seg == 1, 1.0, np.where(seg == 3, -1.0, 0.0))
    # not constant inside segment 3 (mean -1): the fill must even it out
    values[0, 0, 8:, 8:] += np.where(np.indices((8, 8)).sum(0) % 2 == 0, 0.5, -0.5)
    panels, _ = compose_panels(_image(value=100), values, segments=seg)
    panel = panels[1]
    interior = panel[9:15, 9:15].reshape(-1, 3)  # inside segment 3, away from its border
    np.testing.assert_array_equal(np.unique(interior, axis=0), [BLUE])
    # segment 1 (rows 0-7, cols 8-15) is one colour, except its last row, a boundary with 3
    np.testing.assert_array_equal(panel[6, 12], panel[3, 12])
    assert panel[7, 12].astype(int).sum() < panel[3, 12].astype(int).sum() - 30  # boundary: darker


def test_segments_render(tmp_path):
    for fmt in ("svg", "png"):
        render_overlay(_image(), _values(2), ["a", "b"], tmp_path / f"s.{fmt}", fmt=fmt,
                       segments=_quadrants())
    _svg_root(tmp_path / "s.svg")
    _png(tmp_path / "s.png")


# --- hostile and long titles --------------------------------------------------------------------

def _random_titles(rng: random.Random, n: int) -> list[str]:
    """Random strings over all of Unicode (lone surrogates, controls, non-characters included),
    plus the characters that break XML or a line."""
    specials = "\x00\x01\x08\x0b\x0c\x1b\x7f\x85\r\n\t\ud800\udc00\udfff\ufffe\uffff&<>\"'$\\]]>"
    out = []
    for _ in range(n):
        chars = [rng.choice(specials) if rng.random() < 0.4 else chr(rng.randrange(0x110000))
                 for _ in range(rng.randrange(0, 40))]
        out.append("".join(chars))
    return out


def _xml_char(c: str) -> bool:
    o = ord(c)
    return o in (0x9, 0xA, 0xD) or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000


def test_hostile_titles_give_valid_files(tmp_path):
    rng = random.Random(7)
    for attempt in range(6):
        names = _random_titles(rng, 4)
        titles = [format_title(n, 0.5) for n in names[:2]] + names[2:]  # raw strings too
        for fmt in ("svg", "png"):
            path = tmp_path / f"h{attempt}.{fmt}"
            render_overlay(_image(), _values(4), titles, path, fmt=fmt)
        root = _svg_root(tmp_path / f"h{attempt}.svg")
        drawn = [t.text or "" for t in root.iter(f"{SVG}text") if (t.get("id") or "").startswith("title-")]
        assert len(drawn) == 4
        for title, text in zip(titles, drawn):
            # XML 1.0 characters only, one line, the rest of the title kept (unless cut)
            expected = "".join(c if _xml_char(c) and not 0x7F <= ord(c) <= 0x9F else "\ufffd"
                               for c in re.sub("[\t\n\r]+", " ", title))
            assert text == expected or (text.endswith("\u2026") and expected.startswith(text[:-1].rstrip())) \
                or (text.endswith(")") and "\u2026 (" in text) or "\u2026: p = " in text, (title, text)
        _png(tmp_path / f"h{attempt}.png")
    # the case: a lone surrogate from JSON kills nothing and reads as U+FFFD
    render_overlay(_image(), _values(1), ["\ud800 (0.50)"], tmp_path / "s.svg")
    assert "\ufffd (0.50)" in _texts(_svg_root(tmp_path / "s.svg"))


def test_long_titles_are_cut_to_their_panel(tmp_path):
    long_name = "very long class name " * 250  # ~5000 characters
    titles = [format_title(long_name, 0.5), format_title("short", 0.25)]
    lay = layout(2, (16, 16))
    text, size = fit_title(titles[0], lay.title_width)
    assert text.endswith("\u2026: p = 0.50") and text.startswith("very long class name")
    assert len(text) < 60 and text_width_pt(text, size) <= lay.title_width
    assert fit_title(titles[1], lay.title_width) == ("short: p = 0.25", 9.0)
    # a bit too long for 9 pt: shrunk, not cut
    medium = format_title("a rather long but still reasonable name", 0.5)
    text, size = fit_title(medium, lay.title_width)
    assert text == medium and 6.0 <= size < 9.0

    root = ET.fromstring(overlay_bytes(_image(), _values(2), titles, fmt="svg"))
    assert [t for t in _texts(root) if "p = 0.50" in t] == [fit_title(titles[0], lay.title_width)[0]]
    (tooltip,) = [e.text for e in root.iter(f"{SVG}title")]  # the long name as a tooltip, bounded
    assert tooltip.startswith(long_name[:3000]) and len(tooltip) <= 4001

    # PNG: the title's ink stays over its own panel (it would cover the whole figure uncut)
    render_overlay(_image(), _values(2), titles, tmp_path / "long.png", fmt="png", dpi=100)
    img = _png(tmp_path / "long.png")
    band = img[: round(lay.panels[1][1] * 100 / 72)]  # above the panels: titles only
    ink = np.nonzero((band < 128).any(axis=(0, 2)))[0]
    x0, _, x1, _ = _box(lay, 1, 100)
    first = ink[ink < (x1 + _box(lay, 2, 100)[0]) // 2]
    assert first.min() >= x0 - 3 and first.max() <= x1 + 3
    assert (band[:, : _box(lay, 0, 100)[2]] > 250).all()  # nothing over the image panel


# --- files and processes ------------------------------------------------------------------------

def test_missing_folders_created_and_no_temp_left(tmp_path):
    path = tmp_path / "a" / "b" / "c" / "x.png"
    render_overlay(_image(), _values(1), ["a"], path, fmt="png", dpi=30)
    render_overlay(_image(), _values(1), ["b"], path, fmt="png", dpi=30)  # overwrite in place
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]


def test_failed_render_leaves_old_file_untouched(tmp_path):
    path = tmp_path / "x.svg"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        render_overlay(_image(), _values(2), ["only one title"], path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.svg"]


def test_threads_agree(tmp_path):
    args = (_image(), _values(2), ["a", "b"])
    render_overlay(*args, tmp_path / "serial.svg")
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda i: render_overlay(*args, tmp_path / f"t{i}.svg"), range(3)))
    expected = (tmp_path / "serial.svg").read_bytes()
    assert all((tmp_path / f"t{i}.svg").read_bytes() == expected for i in range(3))


def test_quiet_without_matplotlib_when_home_is_not_writable(tmp_path):
    """A read-only HOME/MPLCONFIGDIR makes matplotlib warn on import (issue 10); the renderer
    and the modules of a run do not import it. Simulated with paths below a regular file, which
    not even root can create."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {**os.environ, "HOME": str(blocker), "MPLCONFIGDIR": str(blocker / "mpl"),
           "XDG_CACHE_HOME": str(blocker / "cache"), "PYTHONWARNINGS": "default"}
    code = ("import sys, numpy as np; from pathlib import Path; "
            "import explain_cli.cli, explain_cli.pipeline; "
            "from explain_cli.explainers import deep, gradient, kernel, partition; "
            "from explain_cli.render import render_overlay; "
            "px = np.zeros((16, 16, 3), np.uint8); v = np.ones((2, 3, 16, 16), np.float32); "
            "[render_overlay(px, v, ['a', 'b'], Path(sys.argv[1]) / f'x.{f}', fmt=f) for f in ('svg', 'png')]; "
            "print('matplotlib' in sys.modules, 'shap' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"] and proc.stderr == ""
    # the environment does reproduce the problem with matplotlib
    control = subprocess.run([sys.executable, "-c", "import matplotlib.pyplot"], capture_output=True,
                             text=True, env=env)
    assert "MPLCONFIGDIR" in control.stderr or "mkdir" in control.stderr


def test_without_matplotlibs_font_pillows_own_is_used(tmp_path, monkeypatch):
    from explain_cli import render

    with_dejavu = overlay_bytes(_image(), _values(2), ["a title (0.50)", "b"], fmt="png")
    monkeypatch.setattr(render, "_FONT_PATH", None)
    render._thread_font.cache_clear()
    try:
        fallback = overlay_bytes(_image(), _values(2), ["a title (0.50)", "b"], fmt="png")
    finally:
        render._thread_font.cache_clear()
    assert fallback != with_dejavu  # other glyphs, same figure
    with Image.open(io.BytesIO(fallback)) as a, Image.open(io.BytesIO(with_dejavu)) as b:
        assert a.size == b.size
        ink = (np.asarray(a)[:20] < 128).any(axis=2)
        assert ink.any()  # the titles are drawn


def test_run_is_silent_without_a_writable_home(tiny_project):
    """The cron case of issue 10: `explain-cli run -q --no-progress` with HOME and MPLCONFIGDIR
    unusable prints nothing at all (both formats are rendered under the same conditions in
    test_quiet_without_matplotlib_when_home_is_not_writable)."""
    blocker = tiny_project / "not-a-dir"
    blocker.write_text("")
    env = {**os.environ, "HOME": str(blocker), "MPLCONFIGDIR": str(blocker / "mpl"),
           "XDG_CACHE_HOME": str(blocker / "cache"), "XDG_CONFIG_HOME": str(blocker / "config")}
    proc = subprocess.run([sys.executable, "-m", "explain_cli", "run", str(tiny_project / "config.yaml"),
                           "-q", "--no-progress", "--limit", "1", "--set", "output.format=png"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == "", (proc.stdout, proc.stderr)
    assert len(list((tiny_project / "out" / "overlays").rglob("*.png"))) == 1


@pytest.mark.parametrize("shape", [(16, 48), (40, 12), (1, 30)])
def test_non_square_images_keep_their_aspect(tmp_path, shape):
    h, w = shape
    pixels = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    values = np.random.default_rng(1).normal(size=(2, 3, h, w)).astype(np.float32)
    lay = layout(2, shape)
    for x, y, bw, bh in lay.panels:
        assert bw / bh == pytest.approx(w / h)
        assert bw <= lay.title_width + 1e-9 and y + bh <= lay.bar[1]
    render_overlay(pixels, values, ["a", "b"], tmp_path / "x.png", fmt="png")
    render_overlay(pixels, values, ["a", "b"], tmp_path / "x.svg")
    img = _png(tmp_path / "x.png")
    x0, y0, x1, y1 = _box(lay, 0, 100)
    assert img.shape[0] == round(lay.height * 100 / 72)
    if y1 - y0 >= h:  # the image panel holds the image (scaled nearest)
        assert (img[y0:y1, x0:x1] != 255).any()
    _svg_root(tmp_path / "x.svg")
