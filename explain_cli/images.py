"""Decode an image file and preprocess it as the model saw it in training.

One image goes: file -> *picture* (the model's channel count; :func:`read_picture`) -> resized
(:func:`resize`) -> model input and display pixels (:func:`model_input`). A picture is either

* an 8-bit Pillow image (mode ``RGB`` for 3 channels, ``L`` for 1): resized by Pillow in 8 bits and
  scaled by 1/255, exactly what torchvision's ``Resize`` + ``ToTensor`` do to a PIL image; or
* a float32 (H, W, C) array already on the 0-1 scale: 16-bit and float data (mapped by
  ``preprocess.intensity``), N-channel TIFF/.npy/DICOM, and 8-bit data under an explicit window.
  Each channel is resized by Pillow in float ("F" mode), the same filters.

The *display* pixels (H, W, 3 uint8) are what overlays are drawn on: the model's view of the
chosen ``output.display_channels``, never an input to the model.

A user ``preprocess.transform`` replaces resize and normalisation (:mod:`explain_cli.transform`).
"""

from __future__ import annotations

import errno
import math
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from explain_cli.config import PreprocessConfig
from explain_cli.errors import ImageError

#: Pillow modes of one channel with more than 8 bits (or float) per pixel.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
ARRAY_SUFFIXES = (".npy",)
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")

#: An image on its way to the model: see the module docstring.
Picture = Union[Image.Image, np.ndarray]


class IntensityNeeded(ImageError):
    """A 16-bit or float image met with ``preprocess.intensity`` unset: its 0-1 scale is unknown."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, for *display only* (slide thumbnails, tiles drawn on a heatmap):
    16-bit and float images are stretched to their own range here, never on the way to the model."""
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_DEPTH_MODES:
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


class _Decoding:
    """Turns a decoder's exceptions into ImageError with a short reason (one image's problem,
    never the run's). Pillow's decompression-bomb warning is an error: a file that large is either
    an attack or not a picture this tool can explain in reasonable memory."""

    def __enter__(self) -> "_Decoding":
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self._warnings.__exit__(kind, exc, tb)
        if exc is None or isinstance(exc, ImageError) or not isinstance(exc, Exception):
            return False
        raise _as_image_error(exc) from None


def _as_image_error(exc: Exception) -> ImageError:
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError(f"image too large (decompression-bomb limit): {exc}")
    if isinstance(exc, Image.UnidentifiedImageError):
        return ImageError("not an image Pillow can decode")
    if isinstance(exc, FileNotFoundError):
        return ImageError("file not found")
    if isinstance(exc, MemoryError):
        return ImageError("out of memory while decoding")
    if isinstance(exc, OSError):
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO, errno.ELOOP):
            return ImageError(f"cannot open: {exc.strerror}")
        return ImageError(f"cannot decode image: {exc}")
    if isinstance(exc, (ValueError, SyntaxError, TypeError, IndexError, KeyError, AttributeError)):
        return ImageError(f"cannot decode image: {exc}")
    return ImageError(f"cannot decode image: {type(exc).__name__}: {exc}")


def load_image(path: Path) -> Image.Image:
    """Decode, apply EXIF orientation, convert to 8-bit RGB (for display; see :func:`_to_rgb`)."""
    with _Decoding():
        with open_regular(path) as fh, Image.open(fh) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))


# -- file -> picture -------------------------------------------------------------------------------

def _png_is_16bit_colour(head: bytes) -> bool:
    """Pillow reads 16-bit RGB(A) PNGs as 8-bit RGB: IHDR's bit depth (byte 24) and colour type (25)."""
    return head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 26 and head[24] == 16 and head[25] in (2, 6)


def _read_raw(path: Path, cfg: PreprocessConfig) -> Image.Image | np.ndarray:
    """The file's pixels: a Pillow image where Pillow reads it without loss, else an array."""
    suffix = path.suffix.lower()
    with _Decoding(), open_regular(path) as fh:
        if suffix in DICOM_SUFFIXES:
            from explain_cli.dicom import read_dicom

            return read_dicom(fh, cfg)  # a grayscale one comes back on the 0-1 scale already
        if suffix in ARRAY_SUFFIXES:
            return np.load(fh, allow_pickle=False)
        head = fh.read(32)
        fh.seek(0)
        if _png_is_16bit_colour(head):
            import cv2

            arr = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ImageError("cannot decode image: 16-bit PNG")
            return arr[..., [2, 1, 0] + ([3] if arr.shape[-1] == 4 else [])]
        if suffix in TIFF_SUFFIXES and _tiff_needs_tifffile(fh, cfg):
            import tifffile

            fh.seek(0)
            with tifffile.TiffFile(fh, name=path.name) as tif:
                return tif.asarray()
        fh.seek(0)
        with Image.open(fh) as img:
            img.load()
            return ImageOps.exif_transpose(img)


def _tiff_needs_tifffile(fh, cfg: PreprocessConfig) -> bool:
    """Pages as channels, more than 8 bits per sample in colour, or a channel count Pillow has no
    mode for: tifffile reads those (Pillow would read one page, or drop to 8 bits)."""
    if cfg.channels not in (1, 3):
        return True
    try:
        with Image.open(fh) as img:
            bits = img.tag_v2.get(258, (8,)) if hasattr(img, "tag_v2") else (8,)
            bits = bits if isinstance(bits, tuple) else (bits,)
            return getattr(img, "n_frames", 1) > 1 or (len(bits) > 1 and max(bits) > 8)
    except Exception:  # noqa: BLE001 - Pillow cannot open it: let tifffile try (it raises its own reason)
        return True


def _channels_last(arr: np.ndarray, n: int) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) -> (H, W, n): the axis with ``n`` entries holds the channels
    (the last one when both could); one channel is repeated for a 3-channel model (gray as RGB)."""
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ImageError(f"an array image must be (H, W), (H, W, C) or (C, H, W); got shape {arr.shape}")
    if arr.shape[-1] == n:
        return arr
    if arr.shape[0] == n:
        return np.moveaxis(arr, 0, -1)
    if n == 3 and arr.shape[-1] == 1:
        return np.repeat(arr, 3, axis=-1)
    if n == 3 and arr.shape[0] == 1:
        return np.repeat(np.moveaxis(arr, 0, -1), 3, axis=-1)
    raise ImageError(f"the image has shape {arr.shape}: no axis of {n} channels (preprocess.channels: {n})")


def _to_unit(arr: np.ndarray, cfg: PreprocessConfig, what: str) -> np.ndarray:
    """Raw values -> float32 on the 0-1 scale, by ``preprocess.intensity``."""
    intensity = cfg.intensity
    if intensity == "per_image":
        data = arr.astype(np.float64)
        lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
        out = (data - lo) / (hi - lo) if hi > lo else np.zeros_like(data)
        return out.astype(np.float32)
    if intensity is not None:
        lo, hi = intensity.range
        return np.clip((arr.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    raise IntensityNeeded(f"{what} ({arr.dtype}) has no fixed 0-1 scale: set preprocess.intensity "
                          f"({{range: [lo, hi]}} with the window the model was trained with, or per_image)")


def _unit_array(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """A Pillow image the 8-bit path does not take, as a float32 (H, W, C) 0-1 array."""
    if img.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(img)
        what = f"a {'32-bit' if img.mode in ('I', 'F') else '16-bit'} image"
    else:
        arr = np.asarray(_eight_bit(img, cfg.channels))
        what = "an 8-bit image"
    return _to_unit(_channels_last(arr, cfg.channels), cfg, what)


def _eight_bit(img: Image.Image, channels: int) -> Image.Image:
    """An 8-bit Pillow image in mode L (1 channel: luma, ITU-R 601-2, as torchvision's Grayscale)
    or RGB (3 channels: a gray image repeated, alpha dropped)."""
    if channels == 1:
        if img.mode in ("L", "1"):
            return img.convert("L")
        if img.mode == "LA":
            return img.getchannel("L")
        return _to_rgb(img).convert("L")
    if channels == 3:
        return _to_rgb(img)
    bands = len(img.getbands())
    raise ImageError(f"the image has {bands} channel{'s' if bands > 1 else ''} ({img.mode}); the model takes "
                     f"{channels} (preprocess.channels): give a multi-page TIFF or a .npy array per image")


def _is_window_0_255(cfg: PreprocessConfig) -> bool:
    return cfg.intensity is not None and cfg.intensity != "per_image" and tuple(cfg.intensity.range) == (0, 255)


def to_picture(raw: Image.Image | np.ndarray, cfg: PreprocessConfig) -> Picture:
    """A decoded image (Pillow or array) as the model's picture: see the module docstring."""
    if isinstance(raw, np.ndarray):
        kind = "a float image" if raw.dtype.kind == "f" else f"a {raw.dtype.itemsize * 8}-bit image"
        return _to_unit(_channels_last(raw, cfg.channels), cfg, kind)
    eight_bit = raw.mode not in HIGH_DEPTH_MODES
    if eight_bit and (cfg.intensity is None or _is_window_0_255(cfg)) and cfg.channels in (1, 3):
        return _eight_bit(raw, cfg.channels)
    return _unit_array(raw, cfg)


def read_picture(path: Path, cfg: PreprocessConfig) -> Picture:
    """Decode ``path`` into the model's picture; ImageError with a short reason otherwise."""
    raw = _read_raw(path, cfg)
    with _Decoding():
        if path.suffix.lower() in DICOM_SUFFIXES and isinstance(raw, np.ndarray):
            return _channels_last(raw, cfg.channels)  # windowed to 0-1 by read_dicom
        return to_picture(raw, cfg)


# -- picture -> model input ------------------------------------------------------------------------

def picture_size(picture: Picture) -> tuple[int, int]:
    """(width, height) of a picture."""
    return picture.size if isinstance(picture, Image.Image) else (picture.shape[1], picture.shape[0])


#: ``resize: crop`` resizes the whole image first (exactly torchvision's Resize + CenterCrop) while
#: that intermediate image is at most this many times the output's area; beyond (a 1 x 20000 strip
#: would need 256 x 5 million pixels) it resamples only the kept region (same region, one step: within
#: one grey level of the two-step result).
TWO_STEP_AREA = 16


def crop_geometry(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of ``resize: crop`` for a ``width`` x ``height``
    image: the image resized with its aspect kept to cover floor(size / crop_fraction) (timm's
    ``scale_size``), then the centre cut. A square size resizes the short side as torchvision's
    ``Resize(int)`` does (long side truncated); [H, W] as timm's ``ResizeKeepRatio``. The cut's
    offset is torchvision's CenterCrop's (rounded half to even)."""
    out_h, out_w = cfg.shape
    scale_h = max(out_h, math.floor(out_h / cfg.crop_fraction))
    scale_w = max(out_w, math.floor(out_w / cfg.crop_fraction))
    if scale_h == scale_w:
        short, long = min(width, height), max(width, height)
        new_short, new_long = scale_h, int(scale_h * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        ratio = min(height / scale_h, width / scale_w)
        new_w, new_h = round(width / ratio), round(height / ratio)
    new_w, new_h = max(new_w, out_w), max(new_h, out_h)
    return new_w, new_h, int(round((new_w - out_w) / 2.0)), int(round((new_h - out_h) / 2.0))


def crop_box(width: int, height: int, cfg: PreprocessConfig) -> tuple[float, float, float, float]:
    """The region of a ``width`` x ``height`` image that ``resize: crop`` keeps, in source pixels
    (:func:`crop_geometry` mapped back onto the source)."""
    out_h, out_w = cfg.shape
    new_w, new_h, left, top = crop_geometry(width, height, cfg)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy


def _resize_one(img: Image.Image, cfg: PreprocessConfig, box: tuple[float, float, float, float] | None) -> Image.Image:
    """One Pillow image (8-bit, or one float channel) at the model's size."""
    out_h, out_w = cfg.shape
    resample = FILTERS[cfg.interpolation]
    if box is not None or cfg.resize == "stretch":
        return img.resize((out_w, out_h), resample, box=box)
    new_w, new_h, left, top = crop_geometry(img.width, img.height, cfg)
    if new_w * new_h > TWO_STEP_AREA * out_w * out_h:
        return img.resize((out_w, out_h), resample, box=crop_box(img.width, img.height, cfg))
    return img.resize((new_w, new_h), resample).crop((left, top, left + out_w, top + out_h))


def resize(picture: Picture, cfg: PreprocessConfig,
           box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """The picture at the model's size: (H, W, 3) or (H, W) uint8 for an 8-bit picture, (H, W, C)
    float32 for an array picture. ``box`` (source pixels) overrides stretch/crop.

    Work and memory are bounded by the output size (see TWO_STEP_AREA), whatever the aspect ratio
    of the source.
    """
    if isinstance(picture, Image.Image):
        return np.asarray(_resize_one(picture, cfg, box), dtype=np.uint8)
    channels = [np.asarray(_resize_one(Image.fromarray(np.ascontiguousarray(picture[..., c]), "F"), cfg, box),
                           dtype=np.float32)
                for c in range(picture.shape[-1])]
    return np.stack(channels, axis=-1)


def normalise(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(N?, H, W, C) -> (N?, C, H, W) float32: uint8 scaled by 1/255 (float input is on the 0-1 scale
    already), then (x - mean) / std. A (H, W) gray uint8 image is one channel."""
    if pixels.dtype == np.uint8:
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        x = pixels.astype(np.float32) / 255.0
    else:
        x = pixels.astype(np.float32, copy=False)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def display_channels(cfg: PreprocessConfig, channels: int) -> tuple[int, ...]:
    """The channels an overlay shows: ``output.display_channels``, else the image itself (1 or 3
    channels) or channels 0-2 (more)."""
    chosen = cfg._display_channels
    if chosen is not None and all(c < channels for c in chosen):
        return tuple(chosen)
    return (0,) if channels < 3 else (0, 1, 2)


def display_pixels(resized: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """(H, W, 3) uint8 the overlay is drawn on, from a resized picture (see :func:`resize`)."""
    hwc = resized[..., None] if resized.ndim == 2 else resized
    shown = display_channels(cfg, hwc.shape[-1])
    if hwc.dtype != np.uint8:
        hwc = np.clip(np.rint(hwc[..., list(shown)] * 255.0), 0, 255).astype(np.uint8)
    elif shown != tuple(range(hwc.shape[-1])):
        hwc = hwc[..., list(shown)]
    if hwc.shape[-1] == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    return np.ascontiguousarray(hwc)


def model_input(picture: Picture, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(display uint8 HxWx3, model input float32 CxHxW) of one picture (with a user transform: of
    one decoded image, which the transform receives)."""
    if cfg.transform is not None:
        from explain_cli.transform import apply_transform

        return apply_transform(picture, cfg)
    if isinstance(picture, Image.Image):
        picture = to_picture(picture, cfg)  # the same image when it is one already
    try:
        resized = resize(picture, cfg)
    except MemoryError:
        raise ImageError("out of memory while resizing") from None
    return display_pixels(resized, cfg), normalise(resized, cfg)


def load_preprocessed(path: Path, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(display uint8 HxWx3, model input float32 CxHxW) for one file; ImageError on failure."""
    try:
        if cfg.transform is not None:
            return model_input(_read_raw(path, cfg), cfg)
        return model_input(read_picture(path, cfg), cfg)
    except MemoryError:
        raise ImageError("out of memory while resizing") from None


def intensity_problem(path: Path, cfg: PreprocessConfig) -> str | None:
    """Why ``path`` cannot be read under ``cfg`` for want of ``preprocess.intensity`` (a 16-bit or float
    image with the key unset), else None: the run's up-front check (an exit 2 naming the key before a
    folder of such images becomes a folder of errors.csv rows)."""
    if cfg.intensity is not None or cfg.transform is not None:
        return None
    try:
        read_picture(path, cfg)
    except IntensityNeeded as exc:
        return str(exc)
    except ImageError:
        return None
    return None
