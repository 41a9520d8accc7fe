"""Reading slide files: one small interface (``SlideReader``), one backend (OpenSlide).

Another backend (tiffslide, cuCIM) is one class with the same five members, added to
``BACKENDS``. OpenSlide comes from PyPI (openslide-python + openslide-bin, which ships the C
library): no system package. Its reads release the GIL, so the decode thread overlaps them
with explaining.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from explain_cli.errors import ImageError

#: Side of the thumbnail blocks read at a time (thumbnail pixels): memory is one block's region.
THUMBNAIL_BLOCK = 256


class SlideReader(Protocol):
    """What the slide code needs of a slide file."""

    dimensions: tuple[int, int]                 # level-0 (width, height)
    level_downsamples: tuple[float, ...]        # per level, vs level 0
    mpp: float | None                           # level-0 microns per pixel, None when the file has none

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> Image.Image:
        """An RGB region: (x, y) in level-0 pixels, ``size`` in pixels of ``level``."""

    def thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """The whole slide as RGB, fitted into ``size``."""

    def close(self) -> None: ...


def _flatten_rgba(region: Image.Image) -> Image.Image:
    """OpenSlide returns premultiplied RGBA with transparent outside the scanned area: over white,
    as a slide's glass looks."""
    if region.mode != "RGBA":
        return region.convert("RGB")
    white = Image.new("RGB", region.size, (255, 255, 255))
    white.paste(region, mask=region.getchannel("A"))
    return white


class OpenSlideReader:
    """SlideReader over OpenSlide (.svs, .ndpi, .mrxs, .scn, generic tiled TIFF, ...)."""

    def __init__(self, path: Path) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise ImageError("not a slide OpenSlide can read: an unsupported format, or a plain untiled image "
                             "(explain it without slides:, or make it a tiled pyramid, e.g. "
                             "`vips tiffsave in out.tif --tile --pyramid`)") from None
        except (openslide.OpenSlideError, OSError) as exc:
            raise ImageError(f"cannot open slide: {exc}") from None
        self.dimensions = tuple(int(v) for v in self._slide.dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        try:
            mpp = float(props.get("openslide.mpp-x", "nan"))
        except ValueError:
            mpp = float("nan")
        self.mpp = mpp if np.isfinite(mpp) and mpp > 0 else None

    def read(self, x: int, y: int, level: int, size: tuple[int, int]) -> Image.Image:
        import openslide

        try:
            return _flatten_rgba(self._slide.read_region((x, y), level, size))
        except (openslide.OpenSlideError, OSError) as exc:
            raise ImageError(f"cannot read tile at ({x}, {y}): {exc}") from None

    def thumbnail(self, size: tuple[int, int]) -> Image.Image:
        """Block by block from the best level: OpenSlide's get_thumbnail reads that whole level at
        once (858 MB of RGBA for a 60,000 px slide with a 4x level: memory grew with the slide)."""
        import openslide

        width, height = self.dimensions
        scale = min(size[0] / width, size[1] / height)
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        level = self._slide.get_best_level_for_downsample(1 / scale)
        per_level = self.level_downsamples[level]
        canvas = Image.new("RGB", (out_w, out_h), (255, 255, 255))
        try:
            for top in range(0, out_h, THUMBNAIL_BLOCK):
                for left in range(0, out_w, THUMBNAIL_BLOCK):
                    w, h = min(THUMBNAIL_BLOCK, out_w - left), min(THUMBNAIL_BLOCK, out_h - top)
                    x0, y0 = int(left / scale), int(top / scale)  # level-0 corner
                    x1, y1 = min(width, int(round((left + w) / scale))), min(height, int(round((top + h) / scale)))
                    region = (max(1, round((x1 - x0) / per_level)), max(1, round((y1 - y0) / per_level)))
                    block = _flatten_rgba(self._slide.read_region((x0, y0), level, region))
                    canvas.paste(block.resize((w, h), Image.BILINEAR), (left, top))
        except (openslide.OpenSlideError, OSError) as exc:
            raise ImageError(f"cannot read the slide's thumbnail: {exc}") from None
        return canvas

    def close(self) -> None:
        self._slide.close()


BACKENDS = {"openslide": OpenSlideReader}


def open_slide(path: Path, backend: str = "openslide") -> SlideReader:
    """A reader for ``path``; ImageError (an errors.csv row) when it cannot be opened."""
    return BACKENDS[backend](path)


class ReaderCache:
    """Open readers, at most ``size`` at once (least recently used closed first): tiles of a slide
    come in order, so a handful of open slides serve a run of hundreds, with flat memory."""

    def __init__(self, size: int = 4, backend: str = "openslide") -> None:
        self.size = size
        self.backend = backend
        self._open: OrderedDict[Path, SlideReader] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> SlideReader:
        with self._lock:
            reader = self._open.get(path)
            if reader is not None:
                self._open.move_to_end(path)
                return reader
        reader = open_slide(path, self.backend)
        with self._lock:
            self._open[path] = reader
            while len(self._open) > self.size:
                _, old = self._open.popitem(last=False)
                old.close()
        return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._open.values():
                reader.close()
            self._open.clear()
