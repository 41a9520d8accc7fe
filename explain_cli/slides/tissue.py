"""The tissue mask of a slide thumbnail: Otsu's threshold on saturation, as CLAM and TIAToolbox
do (glass and background are unsaturated; stained tissue is not)."""

from __future__ import annotations

import numpy as np

#: Saturation below which nothing counts as tissue, whatever Otsu says: on a blank slide Otsu
#: splits scanner noise in two; real H&E tissue sits far above this.
MIN_SATURATION = 0.05


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: tissue pixels of an (H, W, 3) uint8 thumbnail."""
    from skimage.filters import median, threshold_otsu
    from skimage.morphology import disk

    # HSV saturation (max - min) / max, in uint8 (skimage's rgb2hsv makes three float64 planes:
    # 337 MB for a 3750 px thumbnail)
    high = rgb.max(axis=-1).astype(np.uint16)
    low = rgb.min(axis=-1).astype(np.uint16)
    saturation = ((high - low) * 255 // np.maximum(high, 1)).astype(np.uint8)
    saturation = median(saturation, disk(2))  # CLAM's median blur: no speckle
    floor = int(round(MIN_SATURATION * 255))
    if int(saturation.max()) == int(saturation.min()):
        return saturation > floor
    threshold = max(float(threshold_otsu(saturation)), floor)
    return saturation > threshold


def region_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Share of ``mask`` inside each (x0, y0, x1, y1) box in mask pixels (half-open, clipped;
    a box smaller than a pixel takes the pixel it lies in). Summed-area table: O(1) per box."""
    h, w = mask.shape
    table = np.zeros((h + 1, w + 1), np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    x0 = np.clip(np.floor(boxes[:, 0]).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(boxes[:, 1]).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.maximum(np.ceil(boxes[:, 2]).astype(np.int64), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.ceil(boxes[:, 3]).astype(np.int64), y0 + 1), 1, h)
    inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))
