"""One overlay figure per image, in the visual language of ``shap.image_plot``.

Layout: the image, then one panel per explained class (titled "name: p = probability", see
``format_title``) showing the attribution summed over channels in red (positive) / blue
(negative) over a copy of the image (``output.style``, see STYLES: by default a
contrast-stretched grayscale at 45 % opacity, more visible than shap's 15 %), all panels on one
symmetric colour scale, a horizontal "SHAP value" colour bar below, and a one-line caption
(image, explainer, layer) at the bottom. Unlike ``shap.image_plot`` it works for any k (shap raises for some k, e.g. 3),
for layer-sized attributions (upsampled to the image) and for superpixel explainers
(each segment filled with its value, boundaries drawn faintly). Given each map's ``Trust``
(topk.csv's numbers), the caption ends with their stability and additivity error, a map below
the trust threshold is faded with a note under its panel, and a map of numeric residue is drawn
empty with the note "no attribution" (docs/trust.md, "On the overlay"). The colour limit is the
image's own, or one given for the run (``output.scale``, explain_cli/overlay_scale.py).

Why no matplotlib: this runs once per image for 10^4-10^6 images, and with matplotlib even a
stripped-down figure (one axes, no pyplot, no colorbar axes) cost ~85 ms CPU per SVG and ~55 ms
per PNG at 224 px, k=2: artist set-up, Agg drawing and its SVG writer dominate. The picture is
a handful of rectangles, images and one-line labels at fixed places, so it is composed directly:

* the panels are composited in numpy (faded gray image + shap's colour map + boundaries), as
  before, with shap's colour map rebuilt as the same 256-entry lookup table;
* PNG: one RGB canvas in numpy, panels pasted with Pillow (nearest, like matplotlib's
  ``interpolation="none"``), text drawn by Pillow/FreeType with matplotlib's own DejaVu Sans
  (found on disk; matplotlib is not imported), encoded by a small PNG writer (one filter for
  all rows, zlib's run-length strategy: encoding is the largest cost left);
* SVG: a hand-written document: each panel one base64 PNG ``<image>`` at the image's own
  resolution, the colour bar a vector gradient, titles and labels real ``<text>`` (searchable,
  XML-escaped; no mathtext, so ``$`` is just a character).

Measured with bench/overlay.py (224 px, k=2, median CPU time per overlay on the 2-core dev
machine, bench/results-overlay.txt): 9-10 ms per PNG or SVG, against 170-210 ms for
``shap.image_plot`` + savefig (17-24x).
Nothing here touches process-global state (no rcParams, no pyplot), so it is safe in threads
and worker processes, and a read-only HOME or MPLCONFIGDIR cannot make it print warnings.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import math
import re
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from explain_cli.metrics import UNSTABLE
from explain_cli.write import atomic_write_bytes

__all__ = ["Layout", "STYLES", "Style", "Trust", "channel_map", "fit_caption", "clean_text", "colorbar_ticks", "colormap",
           "compose_panels", "fit_title", "format_title", "layout", "no_attribution", "overlay_bytes", "render_overlay",
           "segment_fill", "symmetric_limit", "trust_caption", "RED_TRANSPARENT_BLUE_LUT"]


def _red_transparent_blue_lut(n: int = 256) -> np.ndarray:
    # shap.plots.colors.red_transparent_blue (shap/plots/colors/_colors.py) is
    # LinearSegmentedColormap.from_list over 200 colours: blue (30, 136, 229) fading from
    # alpha 1 to 0, then red (255, 13, 87) from 0 to 1. from_list places them evenly on [0, 1]
    # and matplotlib samples that piecewise-linear curve at N=256 points: rebuilt here in numpy
    # (``import shap.plots.colors`` imports all of shap, ~3 s). tests/test_render.py checks it
    # against shap's own colour map.
    alpha = np.concatenate([np.linspace(1, 0, 100), np.linspace(0, 1, 100)])
    rgb = np.array([[30, 136, 229]] * 100 + [[255, 13, 87]] * 100, dtype=np.float64) / 255.0
    control = np.concatenate([rgb, alpha[:, None]], axis=1)
    xs, at = np.linspace(0, 1, len(control)), np.linspace(0, 1, n)
    return np.stack([np.interp(at, xs, control[:, c]) for c in range(4)], axis=1)


#: shap's red_transparent_blue as a (256, 4) RGBA float table, matplotlib's sampling.
RED_TRANSPARENT_BLUE_LUT = _red_transparent_blue_lut()

#: Width of one panel in inches (image or class): modest, since there are thousands of figures.
PANEL_INCHES = 2.2
#: shap.image_plot draws the grayscale image with this alpha under the attribution map.
GRAY_ALPHA = 0.15


@dataclass(frozen=True)
class Style:
    """What the class panels show under the map: the image in ``base`` ('gray' luma or 'color'),
    faded to ``opacity`` over white, its levels stretched between the ``stretch`` percentiles."""

    base: str
    opacity: float
    stretch: tuple[float, float] | None


#: ``output.style``: gray (default) is shap's look made readable: the gray image at 45 % opacity
#: with its 2nd-98th percentile stretched to full range (one glint does not flatten the rest);
#: shap is shap.image_plot's exact look (15 %, min-max stretch); heat is the map over the
#: colour image itself (80 %).
STYLES = {"gray": Style("gray", 0.45, (2.0, 98.0)), "shap": Style("gray", GRAY_ALPHA, (0.0, 100.0)),
          "heat": Style("color", 0.8, None)}
DEFAULT_STYLE = "gray"
#: Limit used when every attribution is zero (or not finite): keeps the colour scale valid.
MIN_LIMIT = 1e-8
#: A map is "no attribution" when the sum of |value| over its channel sum (all its colours could
#: show) is below this share of the explained output's magnitude (at least 1). The float32
#: rounding residue of the outputs a map is made from (about 1.2e-7 of them per model call, a
#: few hundred calls) lies far below it, and so does an attribution that could not move the
#: output by a thousandth (a probability by 0.1 point): a per-image colour scale would stretch
#: either to full colour. The values themselves stay in topk.csv and values/*.npz.
NEGLIGIBLE = 1e-3
#: An untrusted map (unstable, or additivity error beyond |output - base|) is drawn with its
#: colours at this share of their opacity: still there to look at, visibly not like a good one.
FADED = 0.35

TITLE_PT, MIN_TITLE_PT, TICK_PT, LABEL_PT, CAPTION_PT, NOTE_PT = 9.0, 6.0, 7.0, 8.0, 6.5, 6.5
NOTE_WARN, NOTE_PLAIN = (176, 0, 32), (85, 85, 85)  # a faded map's note / "no attribution"
_FONT_FAMILY = "DejaVu Sans, Bitstream Vera Sans, Arial, Helvetica, sans-serif"

# XML 1.0 cannot hold C0 controls (except tab/newline/return), lone surrogates or U+FFFE/FFFF,
# and a line break would split a one-line title; C1 controls have no glyph. Lone surrogates come
# from JSON ("\ud800") or surrogateescape'd bytes and cannot even be encoded as UTF-8.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffe\uffff]")
_SPACE_CHARS = re.compile("[\t\n\r]+")
# format_title's ": p = 0.91" (or an older " (0.91)"): kept whole when a title is cut
_PROB_SUFFIX = re.compile(r"(: p = [^:]*| \([^()]*\))$")


def clean_text(text: object) -> str:
    """Any str made drawable and valid in XML: line breaks become spaces, characters XML or
    UTF-8 cannot hold (controls, lone surrogates) become U+FFFD."""
    return _BAD_CHARS.sub("\ufffd", _SPACE_CHARS.sub(" ", str(text)))


def format_title(name: str, probability: float, label: bool = False, contrast: str | None = None) -> str:
    """``"Egyptian cat: p = 0.91"``; ``"normal (label): p = 0.48"`` for the image's own label;
    ``"Egyptian cat rather than tiger cat: p = 0.91"`` for a contrast (p is the explained class's).
    Text is drawn literally (no mathtext: ``$`` is a character); :func:`clean_text` makes any name
    safe to draw and to write into SVG."""
    head = clean_text(name) + (" (label)" if label else "")
    if contrast is not None:
        head += f" rather than {clean_text(contrast)}"
    return f"{head}: p = {float(probability):.2f}"


@dataclass(frozen=True)
class Trust:
    """What topk.csv says about one map, for its panel: ``stability`` (None: not computed), and
    the explained ``output``, its ``base_value`` and ``additivity_error`` (None: not known)."""

    stability: float | None = None
    additivity_error: float | None = None
    output: float | None = None
    base_value: float | None = None

    @property
    def delta(self) -> float | None:
        """|output - base_value|: what the map's values should sum to, in magnitude."""
        if self.output is None or self.base_value is None:
            return None
        return abs(self.output - self.base_value)

    @property
    def scale(self) -> float:
        """The magnitude numeric noise is judged against: the larger of |output|, |base| and 1."""
        return max([1.0] + [abs(v) for v in (self.output, self.base_value) if v is not None and math.isfinite(v)])

    @property
    def unstable(self) -> bool:
        return self.stability is not None and self.stability < UNSTABLE

    @property
    def not_additive(self) -> bool:
        """The values miss output - base by more than output - base itself."""
        delta = self.delta
        return self.additivity_error is not None and delta is not None and self.additivity_error > delta

    def relative_error(self) -> str | None:
        """The additivity error as a share of |output - base|, for the caption."""
        delta = self.delta
        if self.additivity_error is None or delta is None:
            return None
        if delta == 0:
            return "0%" if self.additivity_error == 0 else f"{self.additivity_error:.2g} (output = base)"
        share = self.additivity_error / delta
        return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"

    def note(self) -> str:
        """Why the panel is faded ("" when it is not), short enough for the line under a panel."""
        if self.unstable and self.not_additive:
            return f"faded: unstable ({self.stability:.2f}), additivity error {self.relative_error()}"
        if self.unstable:
            return f"faded: unstable (stability {self.stability:.2f})"
        if self.not_additive:
            return f"faded: additivity error {self.relative_error()}"
        return ""


def no_attribution(values: np.ndarray, scale: float = 1.0) -> bool:
    """Whether a map (C, h, w) says nothing: the sum of |value| of its channel sum is at most
    ``NEGLIGIBLE * max(scale, 1)`` (``scale``: Trust.scale), or no value is finite. Such a map is
    drawn empty with a note instead of having its residue stretched over the whole colour scale.
    The sum, not the largest value: partition spreads a real effect thinly over many pixels."""
    summed = np.abs(np.asarray(values, dtype=np.float64).sum(axis=-3))
    finite = summed[np.isfinite(summed)]
    return finite.size == 0 or float(finite.sum()) <= NEGLIGIBLE * max(float(scale), 1.0)


def trust_caption(trust: Sequence[Trust]) -> str:
    """The caption's numbers, one per panel in order: "stability 0.94, 0.36  ·  additivity error
    0.4%, 121% of |output − base|"; a part whose numbers are unknown for every panel is left out."""
    parts = []
    stab = [t.stability for t in trust]
    if any(v is not None for v in stab):
        parts.append("stability " + ", ".join("\u2013" if v is None else f"{v:.2f}" for v in stab))
    errors = [t.relative_error() for t in trust]
    if any(e is not None for e in errors):
        parts.append("additivity error " + ", ".join("\u2013" if e is None else e for e in errors)
                     + " of |output \u2212 base|")
    return "  \u00b7  ".join(parts)


# --- fonts and text -----------------------------------------------------------------------------

def _font_path() -> str | None:
    """matplotlib's bundled DejaVu Sans (the font shap's figures use), found without importing
    matplotlib; None if it is not installed."""
    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        return None
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return str(path)
    return None


_FONT_PATH = _font_path()


def _font(px: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The font at ``px`` pixels per em, loaded once per size and thread (a FreeType face is
    not meant to be used from two threads at once; worker processes have one thread)."""
    return _thread_font(px, threading.get_ident())


@functools.lru_cache(maxsize=64)
def _thread_font(px: float, thread: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if _FONT_PATH is not None:
        return ImageFont.truetype(_FONT_PATH, px)
    return ImageFont.load_default(px)  # Pillow's own scalable font: same layout, other glyphs


_MEASURE_PX = 100.0  # titles are fitted with metrics at this size, scaled: the same cut at any dpi
_MAX_CHARS = 400


def text_width_pt(text: str, size_pt: float) -> float:
    """Advance width of ``text`` at ``size_pt`` points (1 pt = 1 px at 72 dpi)."""
    return float(_font(_MEASURE_PX).getlength(text)) * size_pt / _MEASURE_PX


def fit_title(title: str, width_pt: float) -> tuple[str, float]:
    """Fit a title on one line over its panel: shrink long ones (down to 6 pt) and cut what
    still does not fit with an ellipsis, keeping the ": p = 0.91" probability, so neighbouring
    titles never overlap. Returns (text, size in points)."""
    title = clean_text(title)
    width_pt *= 0.97  # room for hinting: glyphs drawn at a small pixel size can come out wider
    # (no panel holds _MAX_CHARS characters at 6 pt: longer titles are not measured whole)
    width = text_width_pt(title, TITLE_PT) if len(title) <= _MAX_CHARS else math.inf
    if width <= width_pt:
        return title, TITLE_PT
    if width * MIN_TITLE_PT / TITLE_PT <= width_pt:  # in quarter points: few font sizes to load
        return title, max(MIN_TITLE_PT, math.floor(4 * TITLE_PT * width_pt / width) / 4)
    match = _PROB_SUFFIX.search(title)
    head, tail = (title[: match.start()], match.group()) if match and match.start() > 0 else (title, "")
    head, tail = head[:_MAX_CHARS], "\u2026" + tail[:_MAX_CHARS]

    def fits(n: int) -> bool:
        return text_width_pt(head[:n].rstrip() + tail, MIN_TITLE_PT) <= width_pt

    lo, hi = 0, len(head)  # the longest prefix that fits: fits(lo) or lo == 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return head[:lo].rstrip() + tail, MIN_TITLE_PT


# --- values -> maps -----------------------------------------------------------------------------

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


def colormap(maps: np.ndarray, limit: float) -> np.ndarray:
    """RGBA floats of ``maps`` on the scale [-limit, limit], exactly as matplotlib's
    ``red_transparent_blue(Normalize(-limit, limit)(maps))``: 256 bins, values beyond the
    limit clipped to the ends, NaN transparent."""
    index = _lut_index(np.asarray(maps), limit)
    return np.concatenate([RED_TRANSPARENT_BLUE_LUT, np.zeros((1, 4))])[index]


def _lut_index(maps: np.ndarray, limit: float) -> np.ndarray:
    """The colour map's bin of each value (matplotlib's rule: floor(x * N), clipped), with
    NaN mapped to the extra "bad" bin N."""
    n = len(RED_TRANSPARENT_BLUE_LUT)
    x = (maps.astype(np.float32, copy=False) + np.float32(limit)) * np.float32(n / (2.0 * limit))
    nan = np.isnan(x)
    has_nan = bool(nan.any())
    if has_nan:
        x[nan] = 0.0
    index = np.clip(x, 0, n - 1, out=x).astype(np.intp)
    if has_nan:
        index[nan] = n
    return index


@functools.lru_cache(maxsize=8)
def _blend_table(opacity: float = GRAY_ALPHA, strength: float = 1.0) -> np.ndarray:
    """Every panel colour: (colour-map bin 0..256 with 256 = NaN) x (image level 0..255)
    -> RGB uint8, the colour map's RGBA (its alpha times ``strength``: FADED for an untrusted
    map) over the image level faded to ``opacity`` on white
    (shap draws the gray image at alpha 0.15 on white, then the map on top). A panel is then
    one table look-up per pixel (per channel for a colour base)."""
    lut = np.concatenate([RED_TRANSPARENT_BLUE_LUT, np.zeros((1, 4))])
    faded = 1.0 - opacity + opacity * np.arange(256) / 255.0
    alpha = lut[:, None, 3:4] * strength
    rgb = lut[:, None, :3] * alpha + faded[None, :, None] * (1.0 - alpha)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(-1, 3)


def _gray_levels(pixels: np.ndarray, stretch: tuple[float, float] = (0.0, 100.0)) -> np.ndarray:
    """The grayscale image drawn under the map (luma, its ``stretch`` percentiles stretched to
    0..255; (0, 100) is the image's own range, as shap's gray colormap does). (H, W) intp."""
    rgb = pixels[..., :3].astype(np.float32)
    gray = 0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2]
    if stretch == (0.0, 100.0):
        lo, hi = float(gray.min()), float(gray.max())
    else:
        lo, hi = (float(v) for v in np.percentile(gray, stretch))
    if not hi > lo:
        return np.zeros(gray.shape, dtype=np.intp)
    return np.clip((gray - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.intp)


def _boundaries(segments: np.ndarray) -> np.ndarray:
    """1-pixel segment boundaries (the pixel before each label change, right and down); the
    numpy equivalent of a thin ``skimage.segmentation.find_boundaries``, without importing
    skimage."""
    b = np.zeros(segments.shape, dtype=bool)
    b[:, :-1] |= segments[:, 1:] != segments[:, :-1]
    b[:-1, :] |= segments[1:, :] != segments[:-1, :]
    return b


def _panel_rgb(base: np.ndarray, smap: np.ndarray, limit: float,
               boundary: np.ndarray | None, opacity: float = GRAY_ALPHA, strength: float = 1.0) -> np.ndarray:
    """Composite one class panel: the colour map (with its alpha times ``strength``) over the faded
    image (``base`` (H, W) gray levels, or (H, W, 3) colour), then the faint boundaries. Returns
    (H, W, 3) uint8."""
    table = _blend_table(opacity, strength)
    index = _lut_index(smap, limit)
    index *= 256
    if base.ndim == 2:
        index += base
        out = np.take(table, index, axis=0)
    else:
        out = np.stack([np.take(table[:, c], index + base[..., c]) for c in range(3)], axis=-1)
    if boundary is not None:  # toward dark gray, faintly
        out[boundary] = (out[boundary] * 0.65 + (0.35 * 0.3 * 255 + 0.5)).astype(np.uint8)
    return out


def _as_pixels(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    if pixels.ndim != 3 or pixels.shape[-1] < 3 or 0 in pixels.shape:
        raise ValueError(f"pixels must be (H, W, 3), got shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels[..., :3])


def compose_panels(pixels: np.ndarray, values: np.ndarray, n_titles: int | None = None, *,
                   segments: np.ndarray | None = None, style: str = DEFAULT_STYLE, limit: float | None = None,
                   trust: Sequence[Trust] | None = None) -> tuple[list[np.ndarray], float]:
    """The k+1 panels of the figure at the image's resolution, and the colour limit.

    ``pixels`` is the (H, W, 3) uint8 image fed to the model, ``values`` the (k, C, h, w)
    attributions in rank order (or (C, h, w) for one class), ``segments`` an optional (H, W)
    label map. Panel 0 is the image itself, panel i the composite of class i-1, (H, W, 3) uint8.
    ``limit``: the colour scale's limit (``output.scale`` run or a number); None: this image's
    own (:func:`symmetric_limit` of its maps). ``trust``: one :class:`Trust` per class; a map
    without attribution is drawn empty, an untrusted one faded (see :func:`_compose`).
    """
    panels, limit, _ = _compose(pixels, values, n_titles, segments=segments, style=style, limit=limit, trust=trust)
    return panels, limit


def _checked_values(values: np.ndarray, n_titles: int | None,
                    trust: Sequence[Trust] | None) -> tuple[np.ndarray, list[Trust]]:
    """``values`` as (k, C, h, w) (one class's (C, h, w) gets k = 1) and one Trust per class;
    ValueError when the shapes, the titles or the trust entries do not match."""
    values = np.asarray(values)
    if values.ndim == 3:  # one class
        values = values[None]
    if values.ndim != 4 or values.shape[0] < 1:
        raise ValueError(f"values must be (k, C, h, w) with k >= 1, got shape {values.shape}")
    k = values.shape[0]
    if n_titles is not None and n_titles != k:
        raise ValueError(f"{n_titles} titles for {k} classes")
    trust = list(trust) if trust is not None else [Trust()] * k
    if len(trust) != k:
        raise ValueError(f"{len(trust)} trust entries for {k} classes")
    return values, trust


def _panel_limit(maps: np.ndarray, empty: list[bool], limit: float | None) -> float:
    """The colour limit: the given one (checked), else the symmetric limit of the maps that are not empty."""
    if limit is None:
        shown = [i for i in range(len(empty)) if not empty[i]]
        return symmetric_limit(maps[shown]) if shown else MIN_LIMIT
    if not (math.isfinite(limit) and limit > 0):
        raise ValueError(f"the colour limit must be a positive number, got {limit!r}")
    return limit


def _compose(pixels: np.ndarray, values: np.ndarray, n_titles: int | None = None, *,
             segments: np.ndarray | None = None, style: str = DEFAULT_STYLE, limit: float | None = None,
             trust: Sequence[Trust] | None = None) -> tuple[list[np.ndarray], float, list[tuple[str, bool]]]:
    """:func:`compose_panels` plus each class panel's note and whether it is a warning:
    ("no attribution", False) for a map within numeric noise of zero (drawn empty, left out of
    the per-image limit), (Trust.note(), True) for an unstable or non-additive map (drawn
    FADED), ("", False) otherwise."""
    pixels = _as_pixels(pixels)
    H, W = pixels.shape[:2]
    values, trust = _checked_values(values, n_titles, trust)
    k = values.shape[0]
    maps = channel_map(values, (H, W))
    boundary = None
    if segments is not None:
        seg = np.asarray(segments)
        maps = segment_fill(maps, seg)
        boundary = _boundaries(seg)
    empty = [no_attribution(values[i], trust[i].scale) for i in range(k)]
    limit = _panel_limit(maps, empty, limit)
    look = STYLES[style]
    base = _gray_levels(pixels, look.stretch) if look.base == "gray" else pixels.astype(np.intp)
    panels, notes = [pixels], []
    for i in range(k):
        note = "" if empty[i] else trust[i].note()
        smap = np.zeros_like(maps[i]) if empty[i] else maps[i]
        panels.append(_panel_rgb(base, smap, limit, boundary, look.opacity, FADED if note else 1.0))
        notes.append(("no attribution", False) if empty[i] else (note, bool(note)))
    return panels, float(limit), notes


# --- layout -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where everything goes, in points (1/72 inch) from the top-left corner.

    One layout for both formats: SVG uses it as user units, PNG scales it by dpi/72.
    ``panels`` are (x, y, w, h) image boxes (aspect kept inside each panel's cell),
    ``title_x``/``title_y`` the centre/baseline-bottom of each class title.
    """

    width: float
    height: float
    panels: tuple[tuple[float, float, float, float], ...]
    title_x: tuple[float, ...]
    title_y: float
    title_width: float
    bar: tuple[float, float, float, float]
    tick_len: float
    tick_label_y: float
    label_y: float
    caption_y: float = 0.0  # top of the caption line (0: no caption)
    note_y: float = 0.0  # top of the line of panel notes under the panels (0: no notes)


def layout(k: int, image_size: tuple[int, int], caption: bool = False, notes: bool = False) -> Layout:
    """The figure layout for k classes and an (H, W) image: panels side by side in
    ``PANEL_INCHES`` cells, titles above, the colour bar centred below (as image_plot), and
    with ``caption`` one more line at the bottom; with ``notes`` a line under the panels for
    their notes ("no attribution", why a map is faded). Without either, the layout is as before
    they existed, so such overlays keep their bytes."""
    H, W = image_size
    pt = 72.0
    pw = PANEL_INCHES * pt
    ph = pw * min(max(H / W, 0.5), 2.0)
    gap, title_h, bar_gap, bar_h, bottom = 0.08 * pt, 0.32 * pt, 0.12 * pt, 0.12 * pt, 0.42 * pt
    width = (k + 1) * pw + gap
    caption_h = 0.16 * pt if caption else 0.0
    note_h = 0.14 * pt if notes else 0.0
    height = title_h + ph + note_h + bar_gap + bar_h + bottom + caption_h
    cell_w = pw - gap
    scale = min(cell_w / W, ph / H)
    iw, ih = W * scale, H * scale
    panels = tuple((gap + i * pw + (cell_w - iw) / 2, title_h + (ph - ih) / 2, iw, ih)
                   for i in range(k + 1))
    title_x = tuple(gap + i * pw + cell_w / 2 for i in range(1, k + 1))
    bar_w = min(0.6 * width, 4.0 * pt)
    bar_y = title_h + ph + note_h + bar_gap
    return Layout(width=width, height=height, panels=panels, title_x=title_x,
                  title_y=title_h - 0.06 * pt, title_width=cell_w,
                  bar=((width - bar_w) / 2, bar_y, bar_w, bar_h), tick_len=0.03 * pt,
                  tick_label_y=bar_y + bar_h + 0.05 * pt, label_y=bar_y + bar_h + 0.2 * pt,
                  caption_y=bar_y + bar_h + bottom - 0.02 * pt if caption else 0.0,
                  note_y=title_h + ph + 0.04 * pt if notes else 0.0)


def fit_caption(text: str, width_pt: float, tail: str = "", size_pt: float = CAPTION_PT) -> str:
    """The caption ``text + tail`` cut with an ellipsis to ``width_pt`` at ``size_pt`` (never
    shrunk); the cut falls in ``text``, so a ``tail`` (the trust numbers) stays whole if it fits."""
    text, tail = clean_text(text)[:_MAX_CHARS], clean_text(tail)[:_MAX_CHARS]
    if text_width_pt(text + tail, size_pt) <= width_pt:
        return text + tail
    if text_width_pt("\u2026" + tail, size_pt) > width_pt:
        text, tail = text + tail, ""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width_pt(text[:mid].rstrip() + "\u2026" + tail, size_pt) <= width_pt:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "\u2026" + tail


def colorbar_ticks(limit: float) -> list[float]:
    """Round tick values on [-limit, limit]: matplotlib's colour-bar rule (MaxNLocator with
    nbins=6, steps 1, 2, 2.5, 5, 10), which for a symmetric range is the smallest such step
    (times a power of ten) that gives at most 6 intervals."""
    limit = float(limit)
    scale = 10.0 ** math.floor(math.log10(2 * limit / 6))
    raw = 2 * limit / 6
    step = next(s * scale for s in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5, 10, 20) if s * scale >= raw)
    n = int(math.floor(limit / step * (1 + 1e-9)))
    return [0.0 if i == 0 else i * step for i in range(-n, n + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.6g}".replace("-", "\u2212", 1) if value < 0 else f"{value:.6g}"


def _over_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[:, :3] * rgba[:, 3:] + (1.0 - rgba[:, 3:])
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def _ramp(n: int) -> np.ndarray:
    """The colour bar: the colour map over the white background, n columns (pixel centres
    sampled), (n, 3) uint8."""
    bins = np.minimum((np.arange(n) + 0.5) * (256 / n), 255).astype(np.intp)
    return _over_white(RED_TRANSPARENT_BLUE_LUT[bins])


# --- PNG ----------------------------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(rgb: np.ndarray, dpi: int | None = None) -> bytes:
    """An 8-bit RGB PNG, written here because encoding is the largest cost of an overlay.

    Every row gets the "up" filter (one numpy subtraction, where Pillow tries five filters per
    row) and zlib's run-length strategy: 224 px, k=2 figures encode 1.5-2x faster than with
    zlib level 1's default strategy (and ~4x faster than Pillow's level 6) for files 2-8 %
    larger. Nothing but the pixels and the dpi goes in: identical pixels, identical bytes."""
    h, w = rgb.shape[:2]
    rows = np.ascontiguousarray(rgb).reshape(h, w * 3)
    filtered = np.empty((h, w * 3 + 1), dtype=np.uint8)
    filtered[:, 0] = 2  # "up": each byte minus the byte above it (the first row: above is 0)
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    out = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))]
    if dpi:
        ppm = int(round(dpi / 0.0254))
        out.append(_chunk(b"pHYs", struct.pack(">IIB", ppm, ppm, 1)))
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    data = deflate.compress(filtered) + deflate.flush()
    out += [_chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    return b"".join(out)


def _png_figure(panels: list[np.ndarray], titles: list[tuple[str, float]], limit: float,
                lay: Layout, dpi: int, caption: str = "", notes: Sequence[tuple[str, bool]] = ()) -> bytes:
    s = dpi / 72.0

    def px(v: float) -> int:
        return int(round(v * s))

    canvas = np.full((max(px(lay.height), 1), max(px(lay.width), 1), 3), 255, dtype=np.uint8)
    for rgb, (x, y, w, h) in zip(panels, lay.panels):
        x0, y0, x1, y1 = px(x), px(y), px(x + w), px(y + h)
        if x1 <= x0 or y1 <= y0:
            continue
        if (y1 - y0, x1 - x0) != rgb.shape[:2]:  # nearest, like matplotlib's interpolation "none"
            rgb = np.asarray(Image.fromarray(rgb).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST))
        canvas[y0:y1, x0:x1] = rgb
    bx, by, bw, bh = lay.bar
    x0, x1, y0, y1 = px(bx), px(bx + bw), px(by), px(by + bh)
    canvas[y0:y1, x0:x1] = _ramp(max(x1 - x0, 1))[None]

    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for (text, size), x in zip(titles, lay.title_x):
        draw.text((x * s, lay.title_y * s), text, fill=(0, 0, 0), font=_font(size * s), anchor="md")
    tick_w = max(1, round(0.6 * s))
    for t in colorbar_ticks(limit):
        x = (bx + (t + limit) / (2 * limit) * bw) * s
        draw.line([(x, y1), (x, (by + bh + lay.tick_len) * s)], fill=(0, 0, 0), width=tick_w)
        draw.text((x, lay.tick_label_y * s), _tick_label(t), fill=(0, 0, 0),
                  font=_font(TICK_PT * s), anchor="ma")
    draw.text((lay.width / 2 * s, lay.label_y * s), "SHAP value", fill=(0, 0, 0),
              font=_font(LABEL_PT * s), anchor="ma")
    if caption:
        draw.text((lay.panels[0][0] * s, lay.caption_y * s), caption, fill=(85, 85, 85),
                  font=_font(CAPTION_PT * s), anchor="la")
    for (text, warn), x in zip(notes, lay.title_x):
        if text:
            draw.text((x * s, lay.note_y * s), text, fill=NOTE_WARN if warn else NOTE_PLAIN,
                      font=_font(NOTE_PT * s), anchor="ma")
    return _png(np.asarray(image), dpi)


# --- SVG ----------------------------------------------------------------------------------------

def _xml(text: str) -> str:
    """Escape for XML text and double-quoted attributes (``clean_text`` already ran)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _svg_figure(panels: list[np.ndarray], titles: list[tuple[str, float]], full_titles: list[str],
                limit: float, lay: Layout, dpi: int, caption: str = "",
                notes: Sequence[tuple[str, bool]] = ()) -> bytes:
    # width/height in pixels at ``dpi`` (the size of the PNG at that dpi); content in points
    s = dpi / 72.0
    # SVG places text by its baseline; the PNG (Pillow anchors) by its ascender/descender line
    ascent, descent = (m / _MEASURE_PX for m in _font(_MEASURE_PX).getmetrics())
    out = ['<?xml version="1.0" encoding="utf-8" standalone="no"?>\n',
           f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
           f'version="1.1" width="{_num(lay.width * s)}" height="{_num(lay.height * s)}" '
           f'viewBox="0 0 {_num(lay.width)} {_num(lay.height)}">\n',
           '<rect width="100%" height="100%" fill="#ffffff"/>\n']
    for i, (rgb, (x, y, w, h)) in enumerate(zip(panels, lay.panels)):
        # class panels: crisp cells, as in the PNG; the photo: the viewer's smooth scaling
        style = ' style="image-rendering:pixelated"' if i else ""
        data = base64.b64encode(_png(rgb)).decode("ascii")
        out.append(f'<image id="panel-{i}" x="{_num(x)}" y="{_num(y)}" width="{_num(w)}" '
                   f'height="{_num(h)}" preserveAspectRatio="none"{style} '
                   f'xlink:href="data:image/png;base64,{data}"/>\n')
    out.append(f'<g font-family="{_FONT_FAMILY}" fill="#000000">\n')
    for i, ((text, size), full, x) in enumerate(zip(titles, full_titles, lay.title_x), start=1):
        # a cut title keeps its text as the group's tooltip (and in the file), up to a point
        if len(full) > 10 * _MAX_CHARS:
            full = full[: 10 * _MAX_CHARS] + "\u2026"
        tooltip = f"<g><title>{_xml(full)}</title>" if full != text else "<g>"
        out.append(f'{tooltip}<text id="title-{i}" x="{_num(x)}" y="{_num(lay.title_y - descent * size)}" '
                   f'font-size="{_num(size)}" text-anchor="middle">{_xml(text)}</text></g>\n')
    bx, by, bw, bh = lay.bar
    # over white the colour map is two straight lines: blue -> white at 0 -> red
    ends = _over_white(RED_TRANSPARENT_BLUE_LUT[[0, -1]])
    stops = "".join(f'<stop offset="{o}" stop-color="#{r:02x}{g:02x}{b:02x}"/>'
                    for o, (r, g, b) in zip(("0", "0.5", "1"), (ends[0], (255, 255, 255), ends[1])))
    out.append(f'<defs><linearGradient id="shap-colors">{stops}</linearGradient></defs>\n'
               f'<rect id="colorbar" x="{_num(bx)}" y="{_num(by)}" width="{_num(bw)}" '
               f'height="{_num(bh)}" fill="url(#shap-colors)"/>\n')
    for t in colorbar_ticks(limit):
        x = _num(bx + (t + limit) / (2 * limit) * bw)
        out.append(f'<line x1="{x}" y1="{_num(by + bh)}" x2="{x}" y2="{_num(by + bh + lay.tick_len)}" '
                   f'stroke="#000000" stroke-width="0.6"/>'
                   f'<text x="{x}" y="{_num(lay.tick_label_y + ascent * TICK_PT)}" font-size="{_num(TICK_PT)}" '
                   f'text-anchor="middle">{_tick_label(t)}</text>\n')
    out.append(f'<text id="colorbar-label" x="{_num(lay.width / 2)}" '
               f'y="{_num(lay.label_y + ascent * LABEL_PT)}" font-size="{_num(LABEL_PT)}" '
               f'text-anchor="middle">SHAP value</text>\n')
    if caption:
        out.append(f'<text id="caption" x="{_num(lay.panels[0][0])}" y="{_num(lay.caption_y + ascent * CAPTION_PT)}" '
                   f'font-size="{_num(CAPTION_PT)}" fill="#555555">{_xml(caption)}</text>\n')
    for i, ((text, warn), x) in enumerate(zip(notes, lay.title_x), start=1):
        if text:
            colour = "#{:02x}{:02x}{:02x}".format(*(NOTE_WARN if warn else NOTE_PLAIN))
            kind = "warning" if warn else "empty"
            out.append(f'<text id="note-{i}" class="{kind}" x="{_num(x)}" y="{_num(lay.note_y + ascent * NOTE_PT)}" '
                       f'font-size="{_num(NOTE_PT)}" text-anchor="middle" fill="{colour}">{_xml(text)}</text>\n')
    out.append('</g>\n</svg>\n')
    return "".join(out).encode("utf-8")


# --- entry point --------------------------------------------------------------------------------

def overlay_bytes(pixels: np.ndarray, values: np.ndarray, titles: Sequence[str], *,
                  fmt: str = "svg", dpi: int = 100, segments: np.ndarray | None = None,
                  style: str = DEFAULT_STYLE, caption: str = "", limit: float | None = None,
                  trust: Sequence[Trust] | None = None) -> bytes:
    """The overlay file's content (see :func:`render_overlay`)."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"unsupported overlay format {fmt!r} (svg or png)")
    if style not in STYLES:
        raise ValueError(f"unknown overlay style {style!r} ({', '.join(STYLES)})")
    dpi = int(dpi)
    if dpi < 1:
        raise ValueError(f"dpi must be positive, got {dpi}")
    panels, limit, notes = _compose(pixels, values, len(titles), segments=segments, style=style, limit=limit,
                                    trust=trust)
    lay = layout(len(panels) - 1, panels[0].shape[:2], caption=bool(caption), notes=any(n for n, _ in notes))
    full = [clean_text(t) for t in titles]
    fitted = [fit_title(t, lay.title_width) for t in full]
    numbers = trust_caption(trust) if trust else ""
    text = fit_caption(caption, lay.width - 2 * lay.panels[0][0], "  \u00b7  " + numbers if numbers else "") \
        if caption else ""
    notes = [(fit_caption("", lay.title_width, n, NOTE_PT) if n else "", warn) for n, warn in notes]
    if fmt == "png":
        return _png_figure(panels, fitted, limit, lay, dpi, text, notes)
    return _svg_figure(panels, fitted, full, limit, lay, dpi, text, notes)


def render_overlay(pixels: np.ndarray, values: np.ndarray, titles: Sequence[str], path: Path, *,
                   fmt: str = "svg", dpi: int = 100, segments: np.ndarray | None = None,
                   style: str = DEFAULT_STYLE, caption: str = "", limit: float | None = None,
                   trust: Sequence[Trust] | None = None) -> None:
    """Render the overlay of one image and write it atomically to ``path`` (folders created).

    ``pixels`` is the (H, W, 3) uint8 image fed to the model, ``values`` the (k, C, h, w)
    attributions in rank order, ``titles`` k strings (see :func:`format_title`; any str is
    safe), ``segments`` an optional (H, W) superpixel label map. ``dpi`` is pixels per inch:
    the PNG's resolution, and the SVG's nominal size (its panels always embed the image at its
    own resolution). ``style`` is one of STYLES (``output.style``); ``caption`` a line at the
    bottom (image, explainer, layer), none when empty, followed by the trust numbers when
    ``trust`` (one :class:`Trust` per class) knows them; ``limit`` the colour limit of a run or
    fixed scale (``output.scale``; None: this image's own). A map within numeric noise of zero
    is drawn empty and noted "no attribution"; an unstable or non-additive one faded, with a
    note under its panel saying why. The file is built in memory and written with ``atomic_write_bytes``, so a
    killed run never leaves a half-written overlay (the pipeline treats an existing overlay as
    done); identical inputs give byte-identical files (no dates or ids from a clock).
    """
    data = overlay_bytes(pixels, values, titles, fmt=fmt, dpi=dpi, segments=segments, style=style,
                         caption=caption, limit=limit, trust=trust)
    atomic_write_bytes(Path(path), data)
