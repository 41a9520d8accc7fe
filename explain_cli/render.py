"""One overlay figure per image, in the visual language of ``shap.image_plot``.

Layout: the image, then one panel per top-k class (titled "name (probability)") showing the
attribution summed over channels in red (positive) / blue (negative) over a faded grayscale
copy of the image, all panels on one symmetric colour scale, and a horizontal "SHAP value"
colour bar below. Unlike ``shap.image_plot`` it works for any k (shap raises for some k, e.g. 3),
for layer-sized attributions (upsampled to the image) and for superpixel explainers
(each segment filled with its value, boundaries drawn faintly).

Speed: this runs once per image for thousands of images, so it avoids pyplot (no global figure
manager, nothing to leak) and most of matplotlib's per-figure cost: one axes in inch
coordinates holds every panel, title and the colour bar (no subplots, tight_layout, colorbar
axes or tick machinery), each class panel is composited in numpy (faded image + colour map +
boundaries) into one RGB image drawn with a single ``imshow``, so an SVG embeds exactly k+1
PNGs at the image's own resolution, and PNGs are encoded as RGB at a fast zlib level.
Measured (224x224, k=2, 2 shared cores): ~85 ms CPU per SVG (~350 KB; mostly matplotlib's
PNG encoding of the embedded images), ~55 ms per PNG (~230 KB at 100 dpi), against ~210-240 ms
for ``shap.image_plot`` + savefig.
"""

from __future__ import annotations

import io
import re
import textwrap
import threading
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from explain_cli.write import atomic_write_bytes

__all__ = ["build_figure", "channel_map", "colorbar_ticks", "format_title", "render_overlay",
           "segment_fill", "symmetric_limit", "RED_TRANSPARENT_BLUE"]


def _red_transparent_blue() -> LinearSegmentedColormap:
    # This is shap's colormap ``shap.plots.colors.red_transparent_blue`` (shap/plots/colors/
    # _colors.py), rebuilt here because ``import shap.plots.colors`` imports all of shap
    # (~3 s measured), far more than this module may cost at the start of a run. Blue
    # (30, 136, 229) fading to transparent at 0, then transparent to red (255, 13, 87).
    colors = [(30 / 255, 136 / 255, 229 / 255, a) for a in np.linspace(1, 0, 100)]
    colors += [(255 / 255, 13 / 255, 87 / 255, a) for a in np.linspace(0, 1, 100)]
    cmap = LinearSegmentedColormap.from_list("red_transparent_blue", colors)
    cmap(0.5)  # build the lookup table now, not lazily from several threads at once
    return cmap


RED_TRANSPARENT_BLUE = _red_transparent_blue()

#: Width of one panel in inches (image or class): modest, since there are thousands of figures.
PANEL_INCHES = 2.2
#: shap.image_plot draws the grayscale image with this alpha under the attribution map.
GRAY_ALPHA = 0.15
#: Limit used when every attribution is zero (or not finite): keeps the colour scale valid.
MIN_LIMIT = 1e-8

_TITLE_SIZE = 9.0
_MIN_TITLE_SIZE = 6.0
_TITLE_CHARS = 32  # characters that fit a panel at _TITLE_SIZE (DejaVu Sans, 2.1 inch)

# rcParams needed while the figure is built and saved. ``svg.fonttype: none`` writes text as
# real (XML-escaped) <text> so class names stay searchable; a fixed ``svg.hashsalt`` makes SVG
# element ids, and so the files, reproducible across reruns; ``image.composite_image: False``
# keeps the panels (several images in one axes) separate images at their own resolution instead
# of one composite resampled at the SVG's 72 dpi.
_RC = {"svg.fonttype": "none", "svg.hashsalt": "explain-cli", "svg.image_inline": True,
       "image.composite_image": False, "font.size": _TITLE_SIZE}
# rc_context changes matplotlib's process-global rcParams for its duration, so two threads
# rendering at once would see each other's settings (or restore stale ones): serialise the
# figures. Rendering is Python-bound (GIL) anyway, so this costs little.
_RC_LOCK = threading.Lock()

# XML 1.0 forbids most C0 controls and U+FFFE/U+FFFF: a class name holding one would make the
# SVG unparsable. Tabs/newlines would split the title over lines.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")
_SPACE_CHARS = re.compile("[\t\n\r]+")


def format_title(name: str, probability: float) -> str:
    """``"Egyptian cat (0.91)"``, as matplotlib text that displays ``name`` literally.

    Matplotlib parses text with an even number of unescaped ``$`` as mathtext, so every ``$``
    is escaped as ``\\$`` (matplotlib turns ``\\$`` back into ``$`` in plain text, and this
    also keeps a name's own ``\\$`` intact). Nothing else is special in plain text (``_ % \\ &
    < >`` are drawn as is; the SVG writer XML-escapes them). Characters XML cannot hold are
    replaced by U+FFFD and line breaks by spaces, so the SVG always parses and the title stays
    one line.
    """
    text = str(name).encode("utf-8", "replace").decode("utf-8")  # lone surrogates
    text = _SPACE_CHARS.sub(" ", text)
    text = _BAD_CHARS.sub("\ufffd", text)
    text = text.replace("$", r"\$")
    return f"{text} ({float(probability):.2f})"


def _fit_title(title: str) -> tuple[str, float]:
    """Fit a title over its panel: shrink long ones (down to 6 pt), wrap longer ones on two
    lines and cut what still does not fit with an ellipsis, so neighbours never overlap.
    Short titles (nearly all class names) stay one line, i.e. one searchable SVG <text>."""
    n = len(title)
    if n <= _TITLE_CHARS:
        return title, _TITLE_SIZE
    size = _TITLE_SIZE * _TITLE_CHARS / n
    if size >= _MIN_TITLE_SIZE:
        return title, size
    width = int(_TITLE_CHARS * _TITLE_SIZE / _MIN_TITLE_SIZE)
    lines = textwrap.wrap(title, width, break_long_words=False, break_on_hyphens=False) or [title]
    if len(lines) > 2:
        # never end on a lone backslash: it would turn the escaped "\$" into a visible "\"
        lines = [lines[0], lines[1][: width - 1].rstrip("\\") + "\u2026"]
    return "\n".join(lines), _MIN_TITLE_SIZE


def channel_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sum attributions over channels and upsample to the image ``size`` (H, W).

    ``values`` is (C, h, w) -> (H, W), or (k, C, h, w) -> (k, H, W). Summing over channels is
    what shap.image_plot shows (one signed map per class; for a layer, C is its channel count).
    Upsampling is *nearest* (pixel centres, like PIL NEAREST / torch 'nearest-exact'): a layer
    cell covers a block of pixels and its attribution is one number, so nearest shows the true
    resolution, keeps every value and sign (bilinear would invent smooth gradients, shave the
    peaks and shift the 99.9th percentile used for the colour limit) and for integer factors is
    a plain repeat.
    """
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim not in (3, 4):
        raise ValueError(f"values must be (C, h, w) or (k, C, h, w), got shape {arr.shape}")
    summed = arr.sum(axis=-3)
    H, W = int(size[0]), int(size[1])
    h, w = summed.shape[-2:]
    if (h, w) == (H, W):
        return summed
    if h == 0 or w == 0:
        raise ValueError(f"values have an empty spatial size {(h, w)}")
    if H % h == 0 and W % w == 0:
        return np.repeat(np.repeat(summed, H // h, axis=-2), W // w, axis=-1)
    rows = np.minimum(((np.arange(H) + 0.5) * (h / H)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * (w / W)).astype(np.intp), w - 1)
    return summed[..., rows[:, None], cols[None, :]]


def segment_fill(maps: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Fill each superpixel with one value: the mean of ``maps`` over its pixels.

    ``maps`` is (H, W) or (k, H, W), ``segments`` an (H, W) integer label map. A segment
    explainer already paints its value over the segment, so this is a no-op on exact input; it
    makes the picture honest (one colour per feature) even if the painted map is not exactly
    constant (float noise, channel mixing).
    """
    seg = np.asarray(segments)
    m = np.asarray(maps, dtype=np.float64)
    if seg.shape != m.shape[-2:]:
        raise ValueError(f"segments {seg.shape} do not match the maps {m.shape[-2:]}")
    _, inverse = np.unique(seg, return_inverse=True)
    inverse = inverse.reshape(-1)
    counts = np.bincount(inverse)
    flat = m.reshape(-1, inverse.size)
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        out[i] = (np.bincount(inverse, weights=row, minlength=counts.size) / counts)[inverse]
    return out.reshape(m.shape).astype(np.float32)


def symmetric_limit(maps: np.ndarray) -> float:
    """The colour limit L for the scale [-L, L] shared by all panels, computed as shap does.

    shap.image_plot uses the 99.9th percentile of |values| over all panels, so a few extreme
    pixels do not wash out the rest. Where that is 0 (all zero, or fewer than 0.1% non-zero)
    shap would pass vmin == vmax and paint everything blue; here the limit falls back to the
    largest |value|, then to ``MIN_LIMIT``, so zeros are always the transparent middle.
    """
    a = np.abs(np.asarray(maps, dtype=np.float64)).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return MIN_LIMIT
    limit = float(np.percentile(a, 99.9))
    if not limit > 0:
        limit = float(a.max())
    return limit if limit > 0 else MIN_LIMIT


def _faded_gray(pixels: np.ndarray) -> np.ndarray:
    """The grayscale image as shap draws it under the map: gray colormap stretched to the
    image's own range, alpha 0.15 over the white axes background. (H, W) floats in [0, 1]."""
    rgb = pixels[..., :3].astype(np.float32)
    gray = 0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2]
    lo, hi = float(gray.min()), float(gray.max())
    gray = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
    return 1.0 - GRAY_ALPHA + GRAY_ALPHA * gray


def _boundaries(segments: np.ndarray) -> np.ndarray:
    """1-pixel segment boundaries (the pixel before each label change, right and down); the
    numpy equivalent of a thin ``skimage.segmentation.find_boundaries``, without importing
    skimage."""
    b = np.zeros(segments.shape, dtype=bool)
    b[:, :-1] |= segments[:, 1:] != segments[:, :-1]
    b[:-1, :] |= segments[1:, :] != segments[:-1, :]
    return b


def _panel_rgb(faded: np.ndarray, smap: np.ndarray, norm: Normalize,
               boundary: np.ndarray | None) -> np.ndarray:
    """Composite one class panel: the colour map (with its alpha) over the faded image, then
    the faint boundaries. Returns (H, W, 3) uint8."""
    rgba = RED_TRANSPARENT_BLUE(norm(smap))  # NaN -> the colormap's "bad": transparent
    alpha = rgba[..., 3:4]
    out = rgba[..., :3] * alpha + faded[..., None] * (1.0 - alpha)
    if boundary is not None:
        out[boundary] = out[boundary] * 0.65 + 0.35 * 0.3  # toward dark gray, faintly
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def build_figure(pixels: np.ndarray, values: np.ndarray, titles: Sequence[str], *,
                 segments: np.ndarray | None = None) -> Figure:
    """Build (not save) the overlay figure: one axes holding 1 + k images and the colour bar.

    Separate from :func:`render_overlay` so it can be inspected in tests. ``pixels`` is the
    (H, W, 3) uint8 image fed to the model, ``values`` the (k, C, h, w) attributions in rank
    order, ``titles`` k strings (see :func:`format_title`), ``segments`` an optional (H, W)
    label map. Call it inside ``matplotlib.rc_context`` if rcParams matter (render_overlay
    does).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
        raise ValueError(f"pixels must be (H, W, 3), got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    pixels = pixels[..., :3]
    H, W = pixels.shape[:2]
    values = np.asarray(values)
    if values.ndim == 3:  # one class
        values = values[None]
    k = values.shape[0]
    if k < 1:
        raise ValueError("values must hold at least one class")
    if len(titles) != k:
        raise ValueError(f"{len(titles)} titles for {k} classes")

    maps = channel_map(values, (H, W))
    boundary = None
    if segments is not None:
        seg = np.asarray(segments)
        maps = segment_fill(maps, seg)
        boundary = _boundaries(seg)
    limit = symmetric_limit(maps)
    norm = Normalize(vmin=-limit, vmax=limit)
    faded = _faded_gray(pixels)

    # Hand layout, in inches. All panels live in ONE axes spanning the figure whose data
    # coordinates are inches (one axes instead of k+1 saves most of matplotlib's per-axes
    # cost: tick machinery, title layout); each panel is an imshow with its own extent.
    pw = PANEL_INCHES
    ph = pw * min(max(H / W, 0.5), 2.0)
    gap, title_h, bar_h, bar_gap, bottom = 0.08, 0.32, 0.12, 0.12, 0.42
    fig_w = (k + 1) * pw + gap
    fig_h = bottom + bar_h + bar_gap + ph + title_h
    fig = Figure(figsize=(fig_w, fig_h), facecolor="white")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    ax.set_xlim(0.0, fig_w)
    ax.set_ylim(0.0, fig_h)
    y0 = bottom + bar_h + bar_gap
    for i in range(k + 1):
        x0 = gap + i * pw
        # The panel box is (pw - gap) x ph; fit the image into it keeping its aspect.
        scale = min((pw - gap) / W, ph / H)
        iw, ih = W * scale, H * scale
        extent = (x0 + (pw - gap - iw) / 2, x0 + (pw - gap + iw) / 2, y0 + (ph - ih) / 2,
                  y0 + (ph + ih) / 2)
        # interpolation "none": SVG embeds the image at its own resolution (the viewer
        # scales it); Agg (PNG) draws it as "nearest".
        # gid: the SVG <image> id, so panels can be found (and counted) in the file.
        rgb = pixels if i == 0 else _panel_rgb(faded, maps[i - 1], norm, boundary)
        ax.imshow(rgb, interpolation="none", extent=extent, aspect="auto", gid=f"panel-{i}")
        if i > 0:
            title, size = _fit_title(str(titles[i - 1]))
            ax.text(x0 + (pw - gap) / 2, y0 + ph + 0.06, title, ha="center", va="bottom",
                    fontsize=size, gid=f"title-{i}")
    ax.set_xlim(0.0, fig_w)  # imshow autoscaled to the last extent: restore the inch frame
    ax.set_ylim(0.0, fig_h)
    _draw_colorbar(ax, limit, x_mid=fig_w / 2, width=min(0.6 * fig_w, 4.0), y=bottom, height=bar_h)
    return fig


def colorbar_ticks(limit: float) -> list[float]:
    """Round tick values on [-limit, limit] (matplotlib's default colour-bar locator rule)."""
    ticks = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(-limit, limit)
    step = float(ticks[1] - ticks[0]) if len(ticks) > 1 else limit
    out = []
    for t in ticks:
        t = 0.0 if abs(t) < step * 1e-6 else float(t)
        if -limit * (1 + 1e-9) <= t <= limit * (1 + 1e-9):
            out.append(t)
    return out


def _tick_label(value: float) -> str:
    return f"{value:.6g}".replace("-", "\u2212", 1) if value < 0 else f"{value:.6g}"


def _draw_colorbar(ax, limit: float, *, x_mid: float, width: float, y: float, height: float) -> None:
    """The horizontal "SHAP value" colour bar, drawn in the panels' axes (inch coordinates).

    Equivalent to ``fig.colorbar(..., orientation="horizontal")`` with the outline hidden, as
    shap draws it, but a colorbar needs its own axes with full tick machinery, which was the
    largest fixed cost of the figure (~10-20 ms of ~100 per image).
    """
    ramp = RED_TRANSPARENT_BLUE(np.linspace(0.0, 1.0, 256))[None]
    ramp = ramp[..., :3] * ramp[..., 3:] + (1.0 - ramp[..., 3:])  # over the white background
    x0, x1 = x_mid - width / 2, x_mid + width / 2
    ax.imshow((ramp * 255 + 0.5).astype(np.uint8), interpolation="bilinear",
              extent=(x0, x1, y, y + height), aspect="auto", gid="colorbar")
    ticks = colorbar_ticks(limit)
    xs = [x0 + (t + limit) / (2 * limit) * width for t in ticks]
    ax.vlines(xs, y - 0.03, y, colors="black", linewidth=0.6)
    for x, t in zip(xs, ticks):
        ax.text(x, y - 0.05, _tick_label(t), ha="center", va="top", fontsize=7)
    ax.text(x_mid, y - 0.2, "SHAP value", ha="center", va="top", fontsize=8, gid="colorbar-label")


def _figure_bytes(fig: Figure, fmt: str, dpi: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        # Agg draw + our own encode: RGB (the figure is opaque) at zlib level 3 is ~3x faster
        # than savefig's RGBA at level 6, and the file is smaller (no alpha channel).
        fig.set_dpi(dpi)
        fig.canvas.draw()
        rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
        Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="png", compress_level=3,
                                                          dpi=(dpi, dpi))
    else:
        # No date in the metadata: identical inputs give byte-identical files.
        fig.savefig(buf, format="svg", dpi=dpi, metadata={"Date": None})
    return buf.getvalue()


def render_overlay(pixels: np.ndarray, values: np.ndarray, titles: Sequence[str], path: Path, *,
                   fmt: str = "svg", dpi: int = 100, segments: np.ndarray | None = None) -> None:
    """Render the overlay of one image and write it atomically to ``path`` (folders created).

    The figure is rendered to memory first and written with ``atomic_write_bytes``, so a killed
    run never leaves a half-written overlay (the pipeline treats an existing overlay as done).
    ``dpi`` sets the PNG resolution (and that of the rasterised colour bar in SVG).
    """
    if fmt not in ("svg", "png"):
        raise ValueError(f"unsupported overlay format {fmt!r} (svg or png)")
    with _RC_LOCK, matplotlib.rc_context(_RC):
        fig = build_figure(pixels, values, titles, segments=segments)
        data = _figure_bytes(fig, fmt, dpi)
        # No fig.clear(): nothing global refers to the Figure (no pyplot), so dropping it frees
        # it, and clear() would cost ~50 ms of axes re-initialisation per image.
    atomic_write_bytes(Path(path), data)
