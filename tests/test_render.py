"""Overlay rendering: literal titles, any k, shared symmetric scale, layers, segments, atomic files.

Images are tiny (16-32 px) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from explain_cli.render import (MIN_LIMIT, build_figure, channel_map, colorbar_ticks, format_title,
                                render_overlay, segment_fill, symmetric_limit)

SVG = "{http://www.w3.org/2000/svg}"
TRICKY = ["cat & dog", "<bird>", "fish $x$", "50% off_\\path", 'say "hi"', "a\\$b $5", "кот ü"]


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


def _panels(fig) -> dict[str, np.ndarray]:
    (ax,) = fig.axes
    return {im.get_gid(): np.asarray(im.get_array()) for im in ax.images}


# --- titles -----------------------------------------------------------------------------------

def test_format_title_escapes_dollars_only():
    assert format_title("Egyptian cat", 0.9134) == "Egyptian cat (0.91)"
    assert format_title("fish $x$", 0.5) == r"fish \$x\$ (0.50)"
    assert not cbook.is_math_text(format_title("fish $x$", 0.5))
    assert format_title("50% off_\\path", 0.5) == "50% off_\\path (0.50)"
    # characters XML cannot hold, and line breaks, never reach the SVG
    assert format_title("a\x01b\nc", 0.5) == "a\ufffdb c (0.50)"


def test_svg_parses_and_holds_class_names_literally(tmp_path):
    path = tmp_path / "deep" / "er" / "x.svg"
    titles = [format_title(n, 0.5) for n in TRICKY]
    render_overlay(_image(), _values(len(TRICKY)), titles, path, fmt="svg")
    raw = path.read_text(encoding="utf-8")
    texts = _texts(_svg_root(path))
    for name in TRICKY:
        assert f"{name} (0.50)" in texts, (name, texts)  # one <text>, not mathtext glyphs
    assert "SHAP value" in texts
    assert "cat &amp; dog" in raw and "&lt;bird&gt;" in raw
    assert not any("\\$x" in t for t in texts)  # the escapes are not displayed
    # svg.fonttype 'none': titles are text, not glyph outlines
    assert 'id="DejaVuSans' not in raw


def test_svg_is_reproducible(tmp_path):
    args = (_image(), _values(2), ["a (0.50)", "b (0.20)"])
    render_overlay(*args, tmp_path / "1.svg")
    render_overlay(*args, tmp_path / "2.svg")
    assert (tmp_path / "1.svg").read_bytes() == (tmp_path / "2.svg").read_bytes()


# --- layout: any k ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_plus_one_panels(tmp_path, k):
    titles = [format_title(f"class {i}", 1 / (i + 2)) for i in range(k)]
    fig = build_figure(_image(), _values(k), titles)
    panels = _panels(fig)
    assert sorted(g for g in panels if g.startswith("panel-")) == [f"panel-{i}" for i in range(k + 1)]
    assert all(panels[f"panel-{i}"].shape == (16, 16, 3) for i in range(k + 1))
    np.testing.assert_array_equal(panels["panel-0"], _image())  # the image itself comes first

    path = tmp_path / f"k{k}.svg"
    render_overlay(_image(), _values(k), titles, path)
    root = _svg_root(path)
    images = [e.get("id") for e in root.iter(f"{SVG}image")]
    assert sorted(i for i in images if i.startswith("panel-")) == [f"panel-{i}" for i in range(k + 1)]
    assert [t for t in _texts(root) if t.startswith("class ")] == titles


def test_titles_must_match_classes():
    with pytest.raises(ValueError, match="titles"):
        build_figure(_image(), _values(3), ["a", "b"])


def test_png_valid_and_grows_with_k(tmp_path):
    sizes = {}
    for k in (1, 3):
        path = tmp_path / f"k{k}.png"
        render_overlay(_image(), _values(k), [f"c{i}" for i in range(k)], path, fmt="png", dpi=50)
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG"
            sizes[k] = im.size
    (w1, h1), (w3, h3) = sizes[1], sizes[3]
    assert h1 == h3 and 60 < h1 < 400
    assert w3 > w1 and abs((w3 - w1) - 2 * 2.2 * 50) <= 2  # two more 2.2-inch panels at 50 dpi


def test_unknown_format_rejected(tmp_path):
    with pytest.raises(ValueError, match="format"):
        render_overlay(_image(), _values(1), ["a"], tmp_path / "x.pdf", fmt="pdf")
    assert not (tmp_path / "x.pdf").exists()


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
    # the 4x4 block per cell: same total as the channel sum times the block area
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


def test_layer_sized_values_render(tmp_path):
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
    # shared: the limit of all panels, not of the quietest one
    assert symmetric_limit(maps) > symmetric_limit(maps[:1])


def test_symmetric_limit_zero_and_sparse_maps():
    assert symmetric_limit(np.zeros((2, 8, 8))) == MIN_LIMIT > 0
    sparse = np.zeros((2, 40, 40))
    sparse[0, 3, 3] = -0.5  # fewer than 0.1% non-zero: the percentile is 0, fall back to the max
    assert symmetric_limit(sparse) == 0.5
    assert symmetric_limit(np.full((4, 4), np.nan)) == MIN_LIMIT


def test_colour_scale_shared_and_symmetric():
    # class 0 = +1 everywhere, class 1 = -2 everywhere: the shared limit is 2, so class 1 gets
    # the full blue of the colour map and class 0 only a half-transparent red.
    values = np.zeros((2, 3, 16, 16), dtype=np.float32)
    values[0, 0] = 1.0
    values[1, 2] = -2.0
    panels = _panels(build_figure(_image(value=128), values, ["a", "b"]))
    blue = panels["panel-2"].reshape(-1, 3)
    np.testing.assert_array_equal(np.unique(blue, axis=0), [[30, 136, 229]])
    red = panels["panel-1"].reshape(-1, 3)
    assert len(np.unique(red, axis=0)) == 1
    r, g, b = red[0].astype(int)
    assert r > g and r > b  # red-ish...
    assert g > 13 + 60  # ...but far from the full red (255, 13, 87): half the scale only
    assert colorbar_ticks(2.0) == [-2.0, -1.0, 0.0, 1.0, 2.0]  # symmetric around 0


def test_all_zero_and_nan_attributions_render(tmp_path):
    render_overlay(_image(), np.zeros((3, 3, 16, 16)), ["a", "b", "c"], tmp_path / "z.svg")
    render_overlay(_image(), np.full((1, 3, 16, 16), np.nan), ["a"], tmp_path / "n.png", fmt="png")
    _svg_root(tmp_path / "z.svg")
    panels = _panels(build_figure(_image(value=0), np.zeros((1, 3, 16, 16)), ["a"]))
    # zero attribution is the transparent middle: only the faded (constant) image is left
    assert len(np.unique(panels["panel-1"].reshape(-1, 3), axis=0)) == 1


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
    panel = _panels(build_figure(_image(value=100), values, ["a"], segments=seg))["panel-1"]
    interior = panel[9:15, 9:15].reshape(-1, 3)  # inside segment 3, away from its border
    np.testing.assert_array_equal(np.unique(interior, axis=0), [[30, 136, 229]])
    # segment 1 (rows 0-7, cols 8-15) is one colour, except its last row, a boundary with 3
    np.testing.assert_array_equal(panel[6, 12], panel[3, 12])
    assert panel[7, 12].astype(int).sum() < panel[3, 12].astype(int).sum() - 30  # boundary: darker


def test_segments_render(tmp_path):
    render_overlay(_image(), _values(2), ["a", "b"], tmp_path / "s.svg", segments=_quadrants())
    _svg_root(tmp_path / "s.svg")


# --- files --------------------------------------------------------------------------------------

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


def test_rcparams_restored_and_threads_agree(tmp_path):
    before = matplotlib.rcParams["svg.fonttype"]
    args = (_image(), _values(2), ["a", "b"])
    render_overlay(*args, tmp_path / "serial.svg")
    assert matplotlib.rcParams["svg.fonttype"] == before
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(lambda i: render_overlay(*args, tmp_path / f"t{i}.svg"), range(3)))
    expected = (tmp_path / "serial.svg").read_bytes()
    assert all((tmp_path / f"t{i}.svg").read_bytes() == expected for i in range(3))


def test_import_avoids_pyplot_and_shap():
    code = ("import sys; import explain_cli.render; "
            "print('matplotlib.pyplot' in sys.modules, 'shap' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"]
