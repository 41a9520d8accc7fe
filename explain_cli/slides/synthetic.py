"""Synthetic whole-slide images for tests, benchmarks and the slide demo, made offline.

A pyramidal tiled TIFF (written with tifffile, read by OpenSlide's generic-TIFF driver, MPP in
the resolution tags): near-white glass, pink tissue regions (ellipses) with purple nuclei, and
optional planted dark-blue squares. Every pixel is a function of its level-0 position, so each
pyramid level is drawn directly and tiles are streamed: memory stays at a few tiles whatever
the slide's size.

    python -m explain_cli.slides.synthetic slide.tif --size 6144x4096 --mpp 0.5
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

GLASS = np.array([243, 242, 240], np.float32)
TISSUE = np.array([226, 160, 196], np.float32)
NUCLEUS = np.array([96, 52, 140], np.float32)
PLANTED = np.array([30, 40, 200], np.float32)
TILE = 256


def _hash(a: np.ndarray, b: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic pseudo-random value in [0, 1) per integer pair (a, b)."""
    h = (a.astype(np.uint64) * np.uint64(0x9E3779B1) + b.astype(np.uint64) * np.uint64(0x85EBCA77)
         + np.uint64(seed * 0xC2B2AE3D + 1)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x2C1B3C6D)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(12)
    return (h & np.uint64(0xFFFFFF)).astype(np.float32) / float(1 << 24)


@dataclass
class SlideSpec:
    """What to draw: tissue ellipses (cx, cy, rx, ry) and planted squares (x, y, side), level-0 pixels."""

    width: int
    height: int
    mpp: float = 0.5
    levels: int = 3
    seed: int = 0
    tissue: list[tuple[float, float, float, float]] = field(default_factory=list)
    planted: list[tuple[int, int, int]] = field(default_factory=list)
    noise: float = 1.0           # pixel noise amplitude (1: as drawn by default; 0: flat colours, small fast files)

    @classmethod
    def random(cls, width: int, height: int, mpp: float = 0.5, levels: int = 3, seed: int = 0,
               blobs: int = 3, coverage: float = 0.35, planted: list[tuple[int, int, int]] | None = None,
               noise: float = 1.0) -> "SlideSpec":
        """``blobs`` tissue ellipses covering about ``coverage`` of the slide, placed with ``seed``."""
        rng = np.random.default_rng(seed)
        area = coverage * width * height / blobs
        tissue = []
        for _ in range(blobs):
            ratio = rng.uniform(0.6, 1.6)
            ry = float(np.sqrt(area / (np.pi * ratio)))
            rx = ry * ratio
            cx = float(rng.uniform(min(rx, width / 2), max(width - rx, width / 2)))
            cy = float(rng.uniform(min(ry, height / 2), max(height - ry, height / 2)))
            tissue.append((cx, cy, rx, ry))
        return cls(width, height, mpp, levels, seed, tissue, list(planted or []), noise)

    def region(self, x0: float, y0: float, w: int, h: int, down: float) -> np.ndarray:
        """(h, w, 3) uint8: the pixels of a level whose pixels are ``down`` level-0 pixels wide."""
        xs = x0 + (np.arange(w, dtype=np.float64) + 0.5) * down
        ys = y0 + (np.arange(h, dtype=np.float64) + 0.5) * down
        X, Y = np.meshgrid(xs, ys)
        inside = np.zeros((h, w), bool)
        for cx, cy, rx, ry in self.tissue:
            inside |= ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0
        if self.noise:
            jitter = (_hash(X.astype(np.int64), Y.astype(np.int64), self.seed)[..., None] - 0.5) * self.noise
        else:
            jitter = np.float32(0)
        out = np.broadcast_to(GLASS, (h, w, 3)) + jitter * 4
        if inside.any():
            cell = 24.0
            gx, gy = np.floor(X / cell), np.floor(Y / cell)
            jx = _hash(gx.astype(np.int64), gy.astype(np.int64), self.seed + 1) * 12 + 6
            jy = _hash(gy.astype(np.int64), gx.astype(np.int64), self.seed + 2) * 12 + 6
            present = _hash(gx.astype(np.int64) + 7, gy.astype(np.int64), self.seed + 3) > 0.35
            nucleus = present & ((X - gx * cell - jx) ** 2 + (Y - gy * cell - jy) ** 2 <= 25.0)
            tissue = np.where(nucleus[..., None], NUCLEUS, TISSUE) + jitter * 16
            out = np.where(inside[..., None], tissue, out)
        for px, py, side in self.planted:
            hit = (X >= px) & (X < px + side) & (Y >= py) & (Y < py + side)
            if hit.any():
                out = np.where(hit[..., None], PLANTED, out)
        return np.clip(out, 0, 255).astype(np.uint8)


def _tiles(spec: SlideSpec, down: int, shape: tuple[int, int]) -> Iterator[np.ndarray]:
    h, w = shape
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            yield spec.region(tx * down, ty * down, TILE, TILE, down)


def write_slide(path: Path, spec: SlideSpec, compression: str = "zlib") -> Path:
    """Write ``spec`` as a pyramidal tiled TIFF (levels downsampled by 2, 4, ...) with its MPP."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=spec.width * spec.height * 3 > 2**31) as tw:
        for level in range(spec.levels):
            down = 2 ** level
            shape = (max(1, spec.height // down), max(1, spec.width // down))
            per_cm = 1e4 / (spec.mpp * down)
            tw.write(_tiles(spec, down, shape), shape=(*shape, 3), dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb", compression=compression, resolution=(per_cm, per_cm),
                     resolutionunit="CENTIMETER", subfiletype=0 if level == 0 else 1)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic pyramidal slide (tiled TIFF) for tests and demos.")
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", default="6144x4096", help="level-0 WIDTHxHEIGHT in pixels")
    parser.add_argument("--mpp", type=float, default=0.5, help="level-0 microns per pixel")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blobs", type=int, default=3, help="tissue regions")
    parser.add_argument("--coverage", type=float, default=0.35, help="share of the slide that is tissue")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="pixel noise amplitude (0: flat glass and tissue, small files, faster to write)")
    parser.add_argument("--plant", action="append", default=[], metavar="X,Y,SIDE",
                        help="a dark-blue square at level-0 X,Y of side SIDE (repeatable)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    planted = [tuple(int(v) for v in p.split(",")) for p in args.plant]
    spec = SlideSpec.random(width, height, args.mpp, args.levels, args.seed, args.blobs, args.coverage, planted,
                            args.noise)
    write_slide(args.output, spec)
    print(f"wrote {args.output}: {width}x{height} px at {args.mpp} um/px, {args.levels} levels")


if __name__ == "__main__":
    main()
