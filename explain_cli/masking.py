"""What a hidden pixel becomes and how players' values map to pixels: the one module every masker uses.

The masking explainers (kernel, partition, amortized), the faithfulness metrics and the trainer of
an amortized explainer all hide parts of an image the same way, in pixel space: the normalisation
is undone (:func:`to_pixels`), a *fill* image is built (:func:`fill_pixels`: the image's mean
colour, a constant colour, or a box blur of the image), hidden pixels take the fill's value and the
result is normalised again (:func:`normalise`). Because normalisation is elementwise,
``normalise(where(shown, p, fill)) == where(shown, normalise(p), normalise(fill))``, so a batch of
masked images is built on the device from the normalised image and fill (:func:`compose`).

Players are the units that are shown or hidden together: SLIC superpixels (:func:`segment`) or a
square grid of patches (:func:`grid_labels`); both are an (H, W) label map ``0..M-1``
(:func:`players`). A player's value is painted onto its pixels, split evenly over the channels
(:func:`paint`), so the channel sum at a pixel is its player's value.

The fill syntaxes: kernel's ``fill`` (:func:`parse_fill`), partition's ``mask`` (:func:`parse_mask`,
with inpainting, which partition does itself per mask) and the metrics' baseline
(:func:`parse_baseline`) share one ``blur(KX,KY)`` parser (:func:`parse_blur`).
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Sequence, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

_BLUR = re.compile(r"^blur\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)$")
INPAINT = ("inpaint_telea", "inpaint_ns")
_FILL_HELP = "must be 'mean', a colour ([r, g, b] or one grey level, 0-255) or 'blur(KX,KY)'"
_MASK_HELP = ("must be inpaint_telea, inpaint_ns, blur(KX,KY) with positive integer kernel sizes, "
              "a grey level 0-255 or an [r, g, b] colour with values 0-255")
_BASELINE_HELP = ("must be blur(KX,KY) with positive integer kernel sizes, a grey level 0-255 or an "
                  "[r, g, b] colour with values 0-255")

Fill = Union[str, float, list[float]]


# -- parsing ---------------------------------------------------------------------------------------

def parse_blur(text: str) -> tuple[int, int] | None:
    """``(KX, KY)`` of a ``blur(KX,KY)`` string (spaces and case ignored), None for another string;
    ValueError for a kernel size below 1."""
    match = _BLUR.match(text.strip().lower())
    if not match:
        return None
    kx, ky = int(match.group(1)), int(match.group(2))
    if kx < 1 or ky < 1:
        raise ValueError(f"blur kernel sizes must be >= 1 (got {text!r})")
    return kx, ky


def _blur_form(size: tuple[int, int]) -> str:
    return f"blur({size[0]},{size[1]})"


def parse_fill(value: Any) -> Fill:
    """kernel's ``fill``: 'mean', [r, g, b] floats (a grey level becomes three) or 'blur(KX,KY)'."""
    if isinstance(value, str):
        if value.strip().lower() == "mean":
            return "mean"
        size = parse_blur(value)
        if size is not None:
            return _blur_form(size)
        raise ValueError(f"{_FILL_HELP} (got {value!r})")
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{_FILL_HELP} (got {value!r})")
    if isinstance(value, (int, float)):
        value = [value] * 3
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = list(value) * 3
        if len(value) != 3 or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in value):
            raise ValueError(f"{_FILL_HELP}; a colour has 3 numbers (got {value!r})")
        if not all(0 <= c <= 255 for c in value):
            raise ValueError(f"colour values must be within 0-255 (got {value!r})")
        return [float(c) for c in value]
    raise ValueError(f"{_FILL_HELP} (got {value!r})")


def parse_mask(value: Any) -> Fill:
    """partition's ``mask`` (shap.maskers.Image): inpaint_telea | inpaint_ns | 'blur(KX,KY)' |
    a grey level (float) | [r, g, b] floats; ValueError with a clear message otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{_MASK_HELP} (got {value!r})")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value <= 255:
            raise ValueError(f"a grey level must be between 0 and 255 (got {value!r})")
        return float(value)
    if isinstance(value, (list, tuple)):
        if len(value) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"a colour is written [r, g, b] with three numbers 0-255 (got {list(value)!r})")
        if not all(math.isfinite(v) and 0 <= v <= 255 for v in value):
            raise ValueError(f"colour values must be between 0 and 255 (got {list(value)!r})")
        return [float(v) for v in value]
    if isinstance(value, str):
        text = value.strip().lower()
        if text in INPAINT:
            return text
        size = parse_blur(text)
        if size is not None:
            return _blur_form(size)
        if text.startswith("blur"):
            raise ValueError(f"blur is written blur(KX,KY) with two positive integers, e.g. blur(128,128) "
                             f"(got {value!r})")
        close = difflib.get_close_matches(text, list(INPAINT), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"{_MASK_HELP} (got {value!r}){hint}")
    raise ValueError(f"{_MASK_HELP} (got {value!r})")


def parse_baseline(value: Any) -> Union[str, list[float]]:
    """The metrics' ``metrics_baseline``: partition's mask syntax without inpainting (every step of
    every order would need its own ``cv2.inpaint``); a grey level becomes [g, g, g]."""
    if isinstance(value, str) and value.strip().lower().startswith("inpaint"):
        raise ValueError(f"{_BASELINE_HELP}; inpainting is not available for the metrics (got {value!r})")
    try:
        parsed = parse_mask(value)
    except ValueError as exc:
        raise ValueError(str(exc).replace("inpaint_telea, inpaint_ns, ", "")) from None
    if isinstance(parsed, float):
        return [parsed] * 3
    return parsed


# -- pixels and fills ------------------------------------------------------------------------------

def to_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(N, C, H, W) normalised -> (N, H, W, C) float32 pixel values in [0, 1] (not clipped)."""
    x = images.detach().float().cpu().numpy()
    x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    return np.ascontiguousarray(np.moveaxis(x, 1, -1))


def normalise(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, C) pixel values -> (C, H, W) float32 model input."""
    x = (pixels - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x.astype(np.float32), -1, 0)))


def blur(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``cv2.blur`` of an (H, W, C) float image with a KX-wide, KY-high box (borders reflected, 101)."""
    import cv2

    return cv2.blur(np.ascontiguousarray(pixels, dtype=np.float32), size).reshape(pixels.shape)


def fill_pixels(pixels: np.ndarray, fill: Any) -> np.ndarray:
    """The (H, W, C) pixel-space image (0-1 scale) that replaces hidden pixels: 'mean' (the image's
    mean colour), 'blur(KX,KY)' or a colour on the 0-255 scale."""
    if fill == "mean":
        return np.broadcast_to(pixels.mean(axis=(0, 1), dtype=np.float64).astype(np.float32),
                               pixels.shape).copy()
    if isinstance(fill, str):
        size = parse_blur(fill)
        if size is None:
            raise ValueError(f"fill {_FILL_HELP} (got {fill!r})")
        return blur(pixels, size)
    colour = np.asarray(fill, np.float32).reshape(-1) / 255.0
    if colour.shape[0] == 1 or (colour.shape[0] != pixels.shape[-1] and np.all(colour == colour[0])):
        colour = np.repeat(colour[:1], pixels.shape[-1])  # a grey level (parsed as [g, g, g]) fits any channel count
    if colour.shape[0] != pixels.shape[-1]:
        raise ValueError(f"fill colour has {colour.shape[0]} values for {pixels.shape[-1]} channels")
    return np.broadcast_to(colour, pixels.shape).copy()


def fill_images(images: torch.Tensor, fill: Any, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalised fill image of each of the (N, C, H, W) normalised images, on their device and
    dtype (built in pixel space: normalisation undone and redone)."""
    filled = [normalise(fill_pixels(p, fill), mean, std) for p in to_pixels(images, mean, std)]
    return torch.stack(filled).to(device=images.device, dtype=images.dtype)


def compose(shown: torch.Tensor, labels: torch.Tensor, image: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Masked model inputs (rows, C, H, W) of one image: ``shown`` (rows, M) bool coalitions over the
    players, ``labels`` the (H*W,) long label map, ``image``/``fill`` (C, H, W) normalised."""
    height, width = image.shape[-2:]
    mask = shown[:, labels].view(shown.shape[0], 1, height, width)
    return torch.where(mask, image, fill)


# -- players ---------------------------------------------------------------------------------------

class SegmentSettings(BaseModel):
    """``explainer.segments.*``: a square grid of patches (``grid: G``) or SLIC superpixels (the
    arguments of ``skimage.segmentation.slic``)."""

    model_config = ConfigDict(extra="forbid")
    grid: int | None = Field(None, ge=1, le=64, description="G: players are a G x G grid of patches "
                                                             "(instead of SLIC superpixels)")
    n_segments: int = Field(50, ge=1, le=2000, description="approximate number of superpixels (SLIC's n_segments)")
    compactness: float = Field(30.0, gt=0, le=10_000, description="SLIC's compactness (higher: squarer superpixels)")
    sigma: float = Field(3.0, ge=0, le=100, description="width of SLIC's Gaussian pre-smoothing (0: none)")

    @model_validator(mode="after")
    def _one_kind(self) -> "SegmentSettings":
        if self.grid is not None:
            slic_keys = [name for name in ("n_segments", "compactness", "sigma")
                         if getattr(self, name) != type(self).model_fields[name].default]
            if slic_keys:
                raise ValueError(f"give either grid or the SLIC keys ({', '.join(slic_keys)}), not both")
        return self


def grid_labels(height: int, width: int, grid: int) -> np.ndarray:
    """(H, W) int64 labels of a G x G grid of patches, row-major (``row_band * G + column_band``);
    band ``b`` of a side of length L holds the pixels ``p`` with ``p * G // L == b``."""
    rows = np.arange(height) * grid // height
    cols = np.arange(width) * grid // width
    return (rows[:, None] * grid + cols[None, :]).astype(np.int64)


def segment(pixels: np.ndarray, segments: SegmentSettings) -> np.ndarray:
    """SLIC label map (H, W) int64 with labels 0..M-1 for one (H, W, C) image in [0, 1]."""
    from skimage.segmentation import slic

    as_uint8 = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    if as_uint8.ndim == 3 and as_uint8.shape[-1] == 1:
        as_uint8 = as_uint8[..., 0]  # one channel: SLIC on the gray image (a trailing axis would be a 3rd dimension)
    labels = slic(as_uint8, n_segments=int(segments.n_segments), compactness=float(segments.compactness),
                  sigma=float(segments.sigma), start_label=0,
                  channel_axis=-1 if as_uint8.ndim == 3 else None)
    # SLIC's labels are normally 0..M-1 already; make sure they are contiguous.
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int64)


def players(pixels: np.ndarray, segments: SegmentSettings) -> np.ndarray:
    """The (H, W) label map 0..M-1 of one (H, W, C) image: the grid when ``segments.grid`` is set,
    else SLIC superpixels."""
    if segments.grid is not None:
        return grid_labels(pixels.shape[0], pixels.shape[1], int(segments.grid))
    return segment(pixels, segments)


def paint(phi: np.ndarray, labels: np.ndarray, channels: int) -> np.ndarray:
    """(M, k) player values -> (k, C, H, W) map: each pixel carries its player's value / C."""
    painted = (phi / channels)[labels].astype(np.float32)  # (H, W, k)
    return np.ascontiguousarray(np.broadcast_to(np.moveaxis(painted, -1, 0)[:, None],
                                                (phi.shape[1], channels) + labels.shape))
