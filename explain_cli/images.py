"""Decode any image file to RGB and preprocess it the way the model expects."""

from __future__ import annotations

import errno
import os
import stat
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


def open_regular(path: Path):
    """A binary file object for ``path``, which must be a regular file.

    Opened non-blocking and checked with fstat after opening, so a FIFO, socket or device that
    replaced the image after discovery is refused at once instead of blocking the decoder.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError("not a regular file (a FIFO, socket or device)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_image(path: Path) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB; ImageError with a short reason otherwise.

    Pillow's decompression-bomb warning is treated as an error: a file that large is either an
    attack or not a photo this tool can explain in reasonable memory. Running out of memory on
    one image is that image's error, not the run's.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as fh, Image.open(fh) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large (decompression-bomb limit): {exc}") from None
    except Image.DecompressionBombWarning as exc:
        raise ImageError(f"image too large (decompression-bomb limit): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can decode") from None
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except MemoryError:
        raise ImageError("out of memory while decoding") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO, errno.ELOOP):
            raise ImageError(f"cannot open: {exc.strerror}") from None
        raise ImageError(f"cannot decode image: {exc}") from None
    except (ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None


def crop_box(width: int, height: int, cfg: PreprocessConfig) -> tuple[float, float, float, float]:
    """The region of a ``width`` x ``height`` image that ``resize: crop`` keeps, in source pixels.

    The same region as resizing the short side to size/crop_fraction and cutting the centre
    size x size, computed without that intermediate image (which for a 1x20000 strip was
    256x5 million pixels).
    """
    size = cfg.size
    short = max(size, int(round(size / cfg.crop_fraction)))
    scale = short / min(width, height)
    big_w, big_h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (big_w - size) // 2, (big_h - size) // 2
    sx, sy = width / big_w, height / big_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def resize(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """The (size, size, 3) uint8 image exactly as the model sees it (before normalisation).

    Work and memory are bounded by the output size: ``crop`` resamples only the kept region
    (Pillow's ``box``), whatever the aspect ratio of the source.
    """
    size = cfg.size
    if cfg.resize == "stretch":
        out = img.resize((size, size), Image.BILINEAR)
    else:
        out = img.resize((size, size), Image.BILINEAR, box=crop_box(img.width, img.height, cfg))
    return np.asarray(out, dtype=np.uint8)


def normalise(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(N?, H, W, 3) uint8 -> (N?, 3, H, W) float32, scaled to [0, 1] then (x - mean) / std."""
    x = pixels.astype(np.float32) / 255.0
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def load_preprocessed(path: Path, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(display uint8 HxWx3, model input float32 3xHxW) for one file; ImageError on failure."""
    try:
        pixels = resize(load_image(path), cfg)
        return pixels, normalise(pixels, cfg)
    except MemoryError:
        raise ImageError("out of memory while resizing") from None
