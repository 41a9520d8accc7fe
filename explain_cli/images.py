"""Decode any image file to RGB and preprocess it the way the model expects."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from explain_cli.config import PreprocessConfig
from explain_cli.errors import ImageError


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; 16-bit and float images are rescaled to their own range."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB; ImageError with a short reason otherwise.

    Pillow's decompression-bomb warning is treated as an error: a file that large is either an
    attack or not a photo this tool can explain in reasonable memory.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression-bomb limit): {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"image too large (decompression-bomb limit): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can decode") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def resize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The (size, size, 3) uint8 image exactly as the model sees it (before normalisation)."""
    size = cfg.size
    if cfg.resize == "stretch":
        out = img.resize((size, size), Image.BILINEAR)
    else:
        short = max(size, int(round(size / cfg.crop_fraction)))
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        out = img.crop((left, top, left + size, top + size))
    return np.asarray(out, dtype=np.uint8)


def normalise(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(N?, H, W, 3) uint8 -> (N?, 3, H, W) float32, scaled to [0, 1] then (x - mean) / std."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def load_preprocessed(path: Path, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(display uint8 HxWx3, model input float32 3xHxW) for one file; ImageError on failure."""
    pixels = resize(load_image(path), cfg)
    return pixels, normalise(pixels, cfg)
