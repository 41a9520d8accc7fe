"""A tile's pixels, in the decode stage: read from its slide (or its own file) and preprocessed
like any image. Plays the part of ``images.load_preprocessed`` for slide runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from explain_cli.errors import ImageError
from explain_cli.images import load_image, load_preprocessed, model_input
from explain_cli.slides.plan import SlidePlans
from explain_cli.slides.reader import ReaderCache


class TileSource:
    """Decodes tiles by name; the open slides are cached (a few at once: flat memory)."""

    def __init__(self, input_dir: Path, plans: SlidePlans) -> None:
        self.input_dir = input_dir
        self.plans = plans
        self.readers = ReaderCache()

    def image(self, rel: str):
        """The tile as an RGB PIL image at the read resolution, before preprocessing."""
        try:
            plan, x, y = self.plans.locate(rel)
        except (KeyError, ValueError):
            raise ImageError("not a tile of this run's slides") from None
        if plan.kind == "tiles":
            from explain_cli.discover import source_path

            return load_image(source_path(self.input_dir, rel))
        reader = self.readers.get(Path(plan.source))
        return reader.read(x, y, plan.level, (plan.read_size, plan.read_size))

    def decode(self, rel: str, preprocess) -> tuple[np.ndarray, np.ndarray]:
        """(display uint8 HxWx3, model input float32 CxHxW) of one tile; ImageError on failure. A
        pre-cut tile file is read like any image (16-bit, N channels); a slide's region is 8-bit RGB."""
        try:
            plan, _, _ = self.plans.locate(rel)
        except (KeyError, ValueError):
            raise ImageError("not a tile of this run's slides") from None
        if plan.kind == "tiles":
            from explain_cli.discover import source_path

            return load_preprocessed(source_path(self.input_dir, rel), preprocess)
        return model_input(self.image(rel), preprocess)

    def close(self) -> None:
        self.readers.close()


def pool_cells(values: np.ndarray, cells: int) -> np.ndarray:
    """(k, C, h, w) or (k, h, w) maps -> (k, cells, cells): each block's sum over channels and
    pixels (a sum keeps SHAP's additivity: the cells of a tile add up to its map's total). Pixel
    i of h goes to block floor(i * cells / h), so any map size works."""
    maps = values.sum(axis=1) if values.ndim == 4 else values
    k, h, w = maps.shape
    rows = (np.arange(h) * cells) // h
    cols = (np.arange(w) * cells) // w
    out = np.zeros((k, cells, cells), np.float64)
    np.add.at(out, (slice(None), rows[:, None], cols[None, :]), maps.astype(np.float64))
    return out.astype(np.float32)
