"""The tissue mask of a slide thumbnail: Otsu's threshold on saturation, as CLAM and TIAToolbox
do (glass and background are unsaturated; stained tissue is not). OpenCV rather than
scikit-image here, for memory (see ``tissue_mask``)."""

from __future__ import annotations

import numpy as np

#: Saturation below which nothing counts as tissue, whatever Otsu says: on a blank slide Otsu
#: splits scanner noise in two; real H&E tissue sits far above this.
MIN_SATURATION = 0.05


def saturation(rgb: np.ndarray, rows: int = 256) -> np.ndarray:
    """(H, W) uint8 HSV saturation, 255 * (max - min) / max, computed a strip of rows at a time so the
    temporaries stay small whatever the thumbnail's size."""
    out = np.empty(rgb.shape[:2], np.uint8)
    for top in range(0, rgb.shape[0], rows):
        strip = rgb[top:top + rows]
        high = strip.max(axis=-1).astype(np.uint16)
        low = strip.min(axis=-1).astype(np.uint16)
        out[top:top + rows] = (high - low) * 255 // np.maximum(high, 1)
    return out


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: tissue pixels of an (H, W, 3) uint8 thumbnail.

    OpenCV's 5 x 5 median blur (CLAM's) and Otsu on uint8: scikit-image's median and Otsu on a
    3750 px thumbnail peaked at 270 MB more, so memory grew with the slide."""
    import cv2

    sat = cv2.medianBlur(saturation(np.ascontiguousarray(rgb, dtype=np.uint8)), 5)
    floor = int(round(MIN_SATURATION * 255))
    if int(sat.max()) == int(sat.min()):
        return sat > floor
    threshold, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return sat > max(threshold, floor)


def region_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Share of ``mask`` inside each (x0, y0, x1, y1) box in mask pixels (half-open, clipped;
    a box smaller than a pixel takes the pixel it lies in). Summed-area table: O(1) per box."""
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), np.int32)  # int32: a 4096 px thumbnail counts at most 2^24
    np.cumsum(mask, axis=0, dtype=np.int32, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
    x0 = np.clip(np.floor(boxes[:, 0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.ceil(boxes[:, 2]).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.ceil(boxes[:, 3]).astype(np.int64), y0 + 1), 1, h)
    inside = (table[y1, x1].astype(np.int64) - table[y0, x1] - table[y1, x0] + table[y0, x0])
    return inside / ((x1 - x0) * (y1 - y0))
