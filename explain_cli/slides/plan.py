"""Which tiles of which slides: the plan made before any work (``prepare``; ``validate`` too).

A slide file is cut into a grid of tiles at the read resolution; tiles with too little tissue
(``tissue.py``) are skipped and counted. Pre-tiled slides (``slides.from_names``) take slide and
coordinates from each tile's relative path. Either way a tile is an image of the run, named
``<slide file>/<x>_<y>`` (x, y in level-0 pixels) or by its own file, so resume, shards and the
write stage treat it like any image.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from explain_cli.errors import ConfigError, ImageError

log = logging.getLogger("explain_cli")

#: Longest side of a thumbnail made for a slide without MPP (then thumbnail_mpp cannot apply),
#: and the cap for any thumbnail, so memory does not grow with the slide.
THUMBNAIL_MAX_PX = 4096


@dataclass
class SlidePlan:
    """One slide: its geometry, how it is read, its tiles. Written as slides/<id>/slide.json."""

    id: str                      # the output folder under slides/ (the file's path without extension)
    rel: str                     # the slide file's path relative to input.dir (tiles: the slide's name)
    source: str                  # the slide file (absolute), or the input folder of its tiles
    kind: str                    # "file" | "tiles"
    dimensions: tuple[int, int]  # level-0 (width, height); for tiles, the extent of the tiles
    mpp: float | None            # level-0 microns per pixel
    tile0: int                   # tile side in level-0 pixels
    stride0: int                 # tile step in level-0 pixels
    cells: int                   # heatmap cells per tile side
    thumbnail_mpp: float = 16.0  # slides.tissue.thumbnail_mpp: the thumbnail's resolution
    level: int | None = None     # pyramid level read (files)
    read_size: int | None = None  # tile side in pixels of that level
    read_mpp: float | None = None  # resolution the model sees the tiles at
    tiles_total: int = 0         # tiles of the grid (files) or named tiles
    tiles_no_tissue: int = 0     # skipped by the tissue mask
    tiles: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (x, y) kept, row-major

    def tile_rel(self, x: int, y: int) -> str:
        return f"{self.rel}/{x}_{y}"

    def info(self) -> dict[str, Any]:
        """slide.json: everything merge and the report need, without the tile list."""
        out = asdict(self)
        out.pop("tiles")
        out["tiles_kept"] = len(self.tiles)
        out["cell_px"] = self.tile0 / self.cells
        out["cell_um"] = None if self.mpp is None else self.tile0 / self.cells * self.mpp
        return out


def slide_id(rel: str) -> str:
    """slides/<id>: the file's relative path without its extension (``a/b.svs`` -> ``a/b``)."""
    stem, dot, ext = rel.rpartition(".")
    return stem if dot and "/" not in ext and stem and not stem.endswith("/") else rel


def _unique_ids(rels: list[str]) -> dict[str, str]:
    """Slide file -> id; two files that would share one (a.svs, a.tif) keep their extension."""
    ids = {rel: slide_id(rel) for rel in rels}
    seen: dict[str, int] = {}
    for value in ids.values():
        seen[value] = seen.get(value, 0) + 1
    return {rel: (rel if seen[value] > 1 else value) for rel, value in ids.items()}


def read_geometry(reader, cfg, source: str) -> tuple[float, int, int]:
    """(level-0 pixels per read pixel, level, read size): the best pyramid level for slides.mpp
    (the least downsampled level at or below the asked resolution), or slides.level."""
    if cfg.level is not None:
        if cfg.level >= len(reader.level_downsamples):
            raise ImageError(f"slides.level {cfg.level}: the slide has {len(reader.level_downsamples)} "
                             f"level(s) (0..{len(reader.level_downsamples) - 1})")
        scale = reader.level_downsamples[cfg.level]
        level = cfg.level
    else:
        if reader.mpp is None:
            raise ConfigError("slides.level", f"{source} has no MPP (microns per pixel) in its metadata, so "
                                              f"slides.mpp {cfg.mpp} cannot be honoured: set slides.level "
                                              f"(a pyramid level, 0 = full resolution) instead of slides.mpp")
        scale = cfg.mpp / reader.mpp
        fits = [i for i, d in enumerate(reader.level_downsamples) if d <= scale * (1 + 1e-3)]
        level = fits[-1] if fits else 0
    read_size = max(1, int(round(cfg.tile * scale / reader.level_downsamples[level])))
    return scale, level, read_size


def thumbnail_size(dimensions: tuple[int, int], mpp: float | None, thumbnail_mpp: float) -> tuple[int, int]:
    """The thumbnail's (width, height): thumbnail_mpp when the slide has an MPP, else the longest
    side THUMBNAIL_MAX_PX; never larger than that cap, never larger than the slide."""
    w, h = dimensions
    down = thumbnail_mpp / mpp if mpp else max(w, h) / THUMBNAIL_MAX_PX
    down = max(down, 1.0, max(w, h) / THUMBNAIL_MAX_PX)
    return max(1, math.ceil(w / down)), max(1, math.ceil(h / down))


def plan_file(path: Path, rel: str, ident: str, cfg) -> SlidePlan:
    """The plan of one slide file. Its thumbnail and tissue mask are not kept (the heatmap stage
    reads them again): memory between slides is the tile list only."""
    from explain_cli.slides.reader import open_slide
    from explain_cli.slides.tissue import region_fractions, tissue_mask

    reader = open_slide(path)
    try:
        scale, level, read_size = read_geometry(reader, cfg, rel)
        w, h = reader.dimensions
        tile0 = max(1, int(round(cfg.tile * scale)))
        stride0 = max(1, int(round((cfg.stride or cfg.tile) * scale)))
        thumb = reader.thumbnail(thumbnail_size(reader.dimensions, reader.mpp, cfg.tissue.thumbnail_mpp))
    finally:
        reader.close()
    xs = range(0, w - tile0 + 1, stride0) if w >= tile0 else range(0)
    ys = range(0, h - tile0 + 1, stride0) if h >= tile0 else range(0)
    grid = np.array([(x, y) for y in ys for x in xs], dtype=np.int64).reshape(-1, 2)
    thumb_size = thumb.size
    mask = tissue_mask(np.asarray(thumb.convert("RGB")))
    del thumb
    if len(grid) and cfg.tissue.min_fraction > 0:
        sx, sy = thumb_size[0] / w, thumb_size[1] / h
        boxes = np.stack([grid[:, 0] * sx, grid[:, 1] * sy, (grid[:, 0] + tile0) * sx,
                          (grid[:, 1] + tile0) * sy], axis=1)
        keep = region_fractions(mask, boxes) >= cfg.tissue.min_fraction
    else:
        keep = np.ones(len(grid), bool)
    plan = SlidePlan(id=ident, rel=rel, source=str(path), kind="file", dimensions=(w, h), mpp=reader.mpp,
                     tile0=tile0, stride0=stride0, cells=cfg.heatmap.cells, thumbnail_mpp=cfg.tissue.thumbnail_mpp, level=level, read_size=read_size,
                     read_mpp=None if reader.mpp is None else reader.mpp * scale, tiles_total=len(grid),
                     tiles_no_tissue=int((~keep).sum()), tiles=[(int(x), int(y)) for x, y in grid[keep]])
    return plan


@dataclass
class SlidePlans:
    """Every slide of a run and the run's image list (tile names)."""

    slides: dict[str, SlidePlan]          # source rel (file) or slide id (tiles) -> plan
    images: list[str]                     # tile names, slide by slide, row-major
    errors: list[tuple[str, str]]         # (slide file, reason): errors.csv rows
    unmatched: int = 0                    # files from_names did not match (left out)
    from_names: re.Pattern | None = None
    source: Any = None                    # the TileSource reading these tiles (set by the pipeline)
    _tile_of: dict[str, tuple[str, int, int]] = field(default_factory=dict, repr=False)

    def locate(self, rel: str) -> tuple[SlidePlan, int, int]:
        """(slide, x, y) of a tile name."""
        if self.from_names is not None:
            key, x, y = self._tile_of[rel]
            return self.slides[key], x, y
        source, _, xy = rel.rpartition("/")
        x, _, y = xy.partition("_")
        return self.slides[source], int(x), int(y)


def plan_files(input_dir: Path, rels: list[str], cfg) -> SlidePlans:
    """Plan each slide file; one that cannot be opened or read is an errors.csv row."""
    ids = _unique_ids(rels)
    slides: dict[str, SlidePlan] = {}
    images: list[str] = []
    errors: list[tuple[str, str]] = []
    from explain_cli.discover import source_path

    for rel in rels:
        try:
            plan = plan_file(source_path(input_dir, rel), rel, ids[rel], cfg)
        except ImageError as exc:
            errors.append((rel, str(exc)))
            continue
        slides[rel] = plan
        if not plan.tiles:
            log.warning("slide %s: no tile with tissue >= %.0f%% (%d tiles, thumbnail at %g um/px): nothing "
                        "to explain", rel, 100 * cfg.tissue.min_fraction, plan.tiles_total, cfg.tissue.thumbnail_mpp)
        images.extend(plan.tile_rel(x, y) for x, y in plan.tiles)
    return SlidePlans(slides, images, errors)


def plan_tiles(input_dir: Path, rels: list[str], cfg) -> SlidePlans:
    """Pre-tiled slides: slide and (x, y) from each file's relative path (``slides.from_names``);
    files it does not match are left out and counted. The tile side is slides.tile or the first
    tile's own width."""
    pattern = re.compile(cfg.from_names)
    groups: dict[str, list[tuple[int, int, str]]] = {}
    unmatched = 0
    for rel in rels:
        m = pattern.search(rel)
        if m is None:
            unmatched += 1
            continue
        try:
            x, y = int(m.group("x")), int(m.group("y"))
        except (TypeError, ValueError):
            unmatched += 1
            continue
        groups.setdefault(m.group("slide"), []).append((x, y, rel))
    if not groups:
        raise ConfigError("slides.from_names", f"the pattern {cfg.from_names!r} matches none of the {len(rels)} "
                                               f"selected files (first: {rels[0] if rels else '-'}); it is searched "
                                               f"in each file's path relative to input.dir, e.g. "
                                               f"'(?P<slide>[^/]+)/tile_x(?P<x>\\d+)_y(?P<y>\\d+)'")
    if unmatched:
        log.warning("slides.from_names: %d of %d selected files do not match %r and are left out",
                    unmatched, len(rels), cfg.from_names)
    from explain_cli.discover import source_path

    slides: dict[str, SlidePlan] = {}
    images: list[str] = []
    tile_of: dict[str, tuple[str, int, int]] = {}
    for name in sorted(groups):
        tiles = sorted(groups[name], key=lambda t: (t[1], t[0], t[2]))
        side = cfg.tile
        if side is None:
            try:
                with Image.open(source_path(input_dir, tiles[0][2])) as first:
                    side = first.width
            except (OSError, ValueError):
                side = 224
        xs = sorted({t[0] for t in tiles})
        steps = [b - a for a, b in zip(xs, xs[1:]) if b > a]
        plan = SlidePlan(id=name, rel=name, source=str(input_dir), kind="tiles",
                         dimensions=(max(t[0] for t in tiles) + side, max(t[1] for t in tiles) + side),
                         mpp=cfg.mpp, tile0=side, stride0=min(steps) if steps else side, cells=cfg.heatmap.cells, thumbnail_mpp=cfg.tissue.thumbnail_mpp,
                         read_mpp=cfg.mpp, tiles_total=len(tiles), tiles=[(t[0], t[1]) for t in tiles])
        slides[name] = plan
        for x, y, rel in tiles:
            images.append(rel)
            tile_of[rel] = (name, x, y)
    return SlidePlans(slides, images, [], unmatched, pattern, _tile_of=tile_of)


def plan_slides(input_dir: Path, rels: list[str], cfg) -> SlidePlans:
    return plan_tiles(input_dir, rels, cfg) if cfg.from_names else plan_files(input_dir, rels, cfg)
