"""DICOM input (radiology): pixel data -> rescale slope/intercept -> window -> the 0-1 scale.

pydicom is the optional extra ``[dicom]``. The window is ``preprocess.intensity`` when set (a
range in the rescaled units, e.g. Hounsfield units for CT; or per_image), else the header's first
Window Center / Width with DICOM's linear VOI function (PS3.3 C.11.2.1.2.1), else the image is
refused naming the key. MONOCHROME1 (bright = low values) is inverted so bright means high, as a
viewer shows it. Colour DICOMs (RGB, YBR converted to RGB by pydicom) are 8-bit pictures like a PNG.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from explain_cli.config import PreprocessConfig
from explain_cli.errors import ImageError


def _first(value: Any) -> float:
    """A DICOM multi-valued number's first value (Window Center may hold several)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def header_window(ds: Any) -> tuple[float, float] | None:
    """(centre, width) of the header's first VOI window, None when it has none (or a width < 1)."""
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    c, w = _first(centre), _first(width)
    return (c, w) if w >= 1 else None


def window_to_unit(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function mapped to 0..1: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped;
    a width of 1 is a threshold at the centre."""
    if width <= 1:
        return (values >= centre - 0.5).astype(np.float32)
    return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0).astype(np.float32)


def read_dicom(fh: Any, cfg: PreprocessConfig) -> Image.Image | np.ndarray:
    """A colour DICOM as an 8-bit RGB Pillow image; a grayscale one as a float32 (H, W, 1) array on
    the 0-1 scale (window applied). ImageError for a file this cannot turn into one image."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise ImageError("a DICOM file needs pydicom: pip install 'explain-cli[dicom]'") from None
    try:
        ds = pydicom.dcmread(fh)
    except pydicom.errors.InvalidDicomError as exc:
        raise ImageError(f"not a DICOM file: {exc}") from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError("a DICOM without pixel data (a report, structured data or presentation state)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"a multi-frame DICOM ({frames} frames): one image per file is explained; "
                         f"write each frame as its own file")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - pydicom: missing codec, truncated data, ...
        raise ImageError(f"cannot decode the DICOM pixel data: {exc}") from None
    if int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        if arr.dtype != np.uint8:
            raise ImageError(f"a colour DICOM of {arr.dtype}: only 8-bit colour is read")
        return Image.fromarray(np.ascontiguousarray(arr), "RGB")
    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    unit = _windowed(values, ds, cfg)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        unit = 1.0 - unit
    return unit[..., None]


def _windowed(values: np.ndarray, ds: Any, cfg: PreprocessConfig) -> np.ndarray:
    from explain_cli.images import IntensityNeeded

    if cfg.intensity == "per_image":
        lo, hi = float(values.min()), float(values.max())
        return ((values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)).astype(np.float32)
    if cfg.intensity is not None:
        lo, hi = cfg.intensity.range
        return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    window = header_window(ds)
    if window is None:
        raise IntensityNeeded("a DICOM without Window Center/Width: set preprocess.intensity ({range: [lo, hi]} "
                              "in its rescaled units, e.g. [-1000, 400] for CT lungs in HU)")
    return window_to_unit(values, *window)
