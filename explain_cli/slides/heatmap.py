"""Slide heatmaps, stitched from topk.csv: each tile row carries its slide, its level-0 (x, y) and
its map pooled to cells x cells (``cells``). Everything a heatmap needs is in the CSV and in
slides/<id>/slide.json, so a resumed run, a run cut short and a merge of shards all draw the
same heatmap from the same rows (no state of its own to keep in step).

Per slide, under ``output.dir/slides/<id>/``: heatmap-<class>.png (the stitched map over the
slide thumbnail, the overlays' symmetric red-blue scale, a colour bar and a caption),
probability-<class>.png, maps.npz (the arrays and their geometry), thumbnail.png, tissue.png
and, when asked, heatmap-<class>.tiff (pyramidal, for QuPath). ``slides/index.json`` sums every
slide up for the report.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from explain_cli.errors import ImageError
from explain_cli.names import unescape
from explain_cli.write import atomic_write_bytes, parse_csv, read_csv_text, write_json

log = logging.getLogger("explain_cli")

#: Tiles listed per slide in index.json (by probability and by attribution).
TOP_TILES = 5
#: Longest side of the thumbnail drawn under a heatmap figure (800 px wide at 100 dpi).
FIGURE_THUMBNAIL_PX = 1024


def slide_dir(out_dir: Path, ident: str) -> Path:
    return out_dir / "slides" / ident


def write_slide_info(out_dir: Path, plans) -> None:
    """slides/<id>/slide.json for every planned slide (the same content from every shard)."""
    for plan in plans.slides.values():
        write_json(slide_dir(out_dir, plan.id) / "slide.json", plan.info())


def safe_name(name: str) -> str:
    """A class name as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


@dataclass
class SlideMaps:
    """The stitched arrays of one slide: per explained class, attribution and probability per cell."""

    classes: list[str]
    class_index: list[int]
    attribution: np.ndarray      # (K, rows, cols) float32, NaN where no tile explained the class
    probability: np.ndarray      # (K, rows, cols) float32, NaN likewise
    coverage: np.ndarray         # (rows, cols) int32: tiles explained over each cell
    tiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # tile rel -> x, y, per class p and sum


def _read_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    rows = parse_csv(read_csv_text(path))
    if not rows:
        return []
    header = rows[0]
    return [dict(zip(header, r)) for r in rows[1:] if r]


def stitch(info: dict[str, Any], rows: list[dict[str, str]]) -> SlideMaps:
    """Place each tile row's cells on the slide's cell grid; overlapping tiles (stride < tile) are averaged."""
    cells = int(info["cells"])
    cell_px = float(info["tile0"]) / cells
    width, height = info["dimensions"]
    n_rows, n_cols = max(1, math.ceil(height / cell_px)), max(1, math.ceil(width / cell_px))
    classes: dict[int, str] = {}
    for row in rows:
        classes.setdefault(int(row["class_index"]), row["class_name"])
    order = sorted(classes)
    slot = {c: i for i, c in enumerate(order)}
    total = np.zeros((len(order), n_rows, n_cols), np.float64)
    prob = np.zeros_like(total)
    count = np.zeros((len(order), n_rows, n_cols), np.int32)
    coverage = np.zeros((n_rows, n_cols), np.int32)
    covered: set[str] = set()
    tiles: dict[str, dict[str, Any]] = {}
    for row in rows:
        x, y = int(row["x"]), int(row["y"])
        r0, c0 = int(round(y / cell_px)), int(round(x / cell_px))
        r1, c1 = min(n_rows, r0 + cells), min(n_cols, c0 + cells)
        if r1 <= r0 or c1 <= c0:
            continue
        values = np.array([float(v) for v in row["cells"].split()], np.float64).reshape(cells, cells)
        k = slot[int(row["class_index"])]
        total[k, r0:r1, c0:c1] += values[: r1 - r0, : c1 - c0]
        prob[k, r0:r1, c0:c1] += float(row["probability"])
        count[k, r0:r1, c0:c1] += 1
        image = unescape(row["image"])
        if image not in covered:
            covered.add(image)
            coverage[r0:r1, c0:c1] += 1
        tile = tiles.setdefault(image, {"x": x, "y": y, "classes": {}})
        tile["classes"][row["class_name"]] = {"probability": float(row["probability"]),
                                              "attribution": float(values.sum()), "rank": row.get("rank")}
    with np.errstate(invalid="ignore", divide="ignore"):
        attribution = np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)
        probability = np.where(count > 0, prob / np.maximum(count, 1), np.nan).astype(np.float32)
    return SlideMaps([classes[c] for c in order], order, attribution, probability, coverage, tiles)


def _thumbnail(info: dict[str, Any], tile_rows: dict[str, tuple[int, int]]) -> Image.Image | None:
    """The slide's thumbnail: from the slide file, or (pre-tiled slides) the tiles pasted at a
    small scale. None when the source is gone (the heatmap is then drawn on white)."""
    from explain_cli.slides.plan import thumbnail_size

    size = thumbnail_size(tuple(info["dimensions"]), info.get("mpp"), info["thumbnail_mpp"])  # slide.json: the plan's
    if info["kind"] == "file":
        from explain_cli.slides.reader import open_slide

        try:
            reader = open_slide(Path(info["source"]))
        except ImageError:
            return None
        try:
            return reader.thumbnail(size)
        except ImageError:
            return None
        finally:
            reader.close()
    from explain_cli.discover import source_path
    from explain_cli.images import load_image

    width, height = info["dimensions"]
    scale = size[0] / width
    canvas = Image.new("RGB", size, (255, 255, 255))
    side = max(1, int(round(info["tile0"] * scale)))
    for rel, (x, y) in tile_rows.items():
        try:
            tile = load_image(source_path(Path(info["source"]), rel)).resize((side, side), Image.BILINEAR)
        except ImageError:
            continue
        canvas.paste(tile, (int(round(x * scale)), int(round(y * scale))))
    return canvas


def _figure(thumb: Image.Image | None, grid: np.ndarray, info: dict[str, Any], title: str, caption: str,
            kind: str) -> bytes:
    """One heatmap figure as PNG: the thumbnail (gray, faded) with the cell grid over it and a colour bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap, Normalize

    from explain_cli.render import RED_TRANSPARENT_BLUE_LUT, symmetric_limit

    width, height = info["dimensions"]
    aspect = height / max(width, 1)
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, max(2.5, fig_w * aspect * 0.85)), dpi=100)
    try:
        extent = (0, width, height, 0)
        if thumb is not None:
            small = thumb.convert("L")
            small.thumbnail((FIGURE_THUMBNAIL_PX, FIGURE_THUMBNAIL_PX))  # the figure is 800 px wide: matplotlib
            gray = np.asarray(small, np.float32) / 255.0              # resampled a 3750 px one at 0.8 GB
            ax.imshow(1 - 0.45 * (1 - gray), cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
        else:
            ax.imshow(np.ones((2, 2)), cmap="gray", vmin=0, vmax=1, extent=extent)
        cell_px = float(info["tile0"]) / int(info["cells"])
        grid_extent = (0, grid.shape[1] * cell_px, grid.shape[0] * cell_px, 0)
        if kind == "attribution":
            limit = symmetric_limit(grid)
            cmap = ListedColormap(RED_TRANSPARENT_BLUE_LUT)
            norm = Normalize(-limit, limit)
            label = "SHAP value per cell (sum over the cell's pixels)"
        else:
            cmap = plt.get_cmap("viridis")
            norm = Normalize(0, 1)
            label = "probability of the tile"
        masked = np.ma.masked_invalid(grid)
        image = ax.imshow(masked, cmap=cmap, norm=norm, extent=grid_extent, interpolation="nearest",
                          alpha=None if kind == "attribution" else 0.75)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title, fontsize=10)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
        ax.set_xlabel(caption, fontsize=7, color="#444444")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight", pad_inches=0.08)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _colour_rgb(grid: np.ndarray) -> np.ndarray:
    """The attribution grid as RGB uint8 on white (the figure's colours), for the TIFF."""
    from explain_cli.render import colormap, symmetric_limit

    rgba = colormap(grid, symmetric_limit(grid))
    rgb = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    return (rgb * 255).round().astype(np.uint8)


def write_tiff(path: Path, grid: np.ndarray, info: dict[str, Any]) -> None:
    """A pyramidal tiled TIFF of the coloured heatmap, one pixel per cell, its pixel size in the
    resolution tags (microns from the slide's MPP), so viewers place it at the slide's scale."""
    import tifffile

    rgb = _colour_rgb(grid)
    cell_um = info.get("cell_um")
    levels = [rgb]
    while max(levels[-1].shape[:2]) > 256:
        levels.append(levels[-1][::2, ::2])
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as tw:
        for i, level in enumerate(levels):
            kwargs: dict[str, Any] = {}
            if cell_um:
                per_cm = 1e4 / (cell_um * 2 ** i)
                kwargs = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(level, photometric="rgb", tile=(256, 256) if min(level.shape[:2]) >= 256 else None,
                     compression="zlib", subfiletype=0 if i == 0 else 1, **kwargs)
    atomic_write_bytes(path, buffer.getvalue())


def _npz_bytes(maps: SlideMaps, info: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, attribution=maps.attribution, probability=maps.probability,
                        coverage=maps.coverage, classes=np.array(maps.classes), class_index=np.array(maps.class_index),
                        origin_level0=np.array([0, 0]), cell_px_level0=np.float64(info["cell_px"]),
                        cell_um=np.float64(np.nan if info.get("cell_um") is None else info["cell_um"]),
                        dimensions_level0=np.array(info["dimensions"]),
                        mpp=np.float64(np.nan if info.get("mpp") is None else info["mpp"]))
    return buffer.getvalue()


def _slide_infos(root: Path) -> dict[str, dict[str, Any]]:
    """Every readable slide.json under ``root``, by slide id."""
    infos: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("slide.json")) if root.is_dir() else []:
        try:
            info = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and "id" in info:
            infos[info["id"]] = info
    return infos


def _failed_tiles(infos: dict[str, dict[str, Any]], errors_path: Path | None) -> dict[str, int]:
    """Each slide's tiles in errors.csv."""
    failed: dict[str, int] = {ident: 0 for ident in infos}
    if errors_path is not None:
        by_rel = {info["rel"]: ident for ident, info in infos.items()}
        for row in _read_rows(errors_path):
            image = unescape(row.get("image", ""))
            ident = by_rel.get(image.rpartition("/")[0]) or by_rel.get(image)
            if ident is not None:
                failed[ident] += 1
    return failed


def write_heatmaps(out_dir: Path, topk_path: Path, errors_path: Path | None, explainer: str, layer: str,
                   tiff: bool = False, redraw: set[str] | None = None) -> list[dict[str, Any]]:
    """Stitch and draw every slide with a slide.json under out_dir/slides; write slides/index.json.
    Returns the index entries. ``redraw``: only these slides (and any never drawn) get new
    figures; the others only their index entry (a nightly rerun with nothing new draws nothing:
    drawing is about 1 s per slide and class, stitching milliseconds)."""
    root = out_dir / "slides"
    infos = _slide_infos(root)
    if not infos:
        return []
    rows_by_slide: dict[str, list[dict[str, str]]] = {ident: [] for ident in infos}
    for row in _read_rows(topk_path):
        ident = unescape(row.get("slide", "") or "")
        if ident in rows_by_slide and row.get("cells"):
            rows_by_slide[ident].append(row)
    failed = _failed_tiles(infos, errors_path)
    index = []
    for ident, info in sorted(infos.items()):
        draw = redraw is None or ident in redraw or not (slide_dir(out_dir, ident) / "maps.npz").exists()
        entry = _draw_slide(out_dir, info, rows_by_slide[ident], failed[ident], explainer, layer, tiff, draw)
        index.append(entry)
    write_json(root / "index.json", {"slides": index})
    return index


def _draw_slide(out_dir: Path, info: dict[str, Any], rows: list[dict[str, str]], failed: int, explainer: str,
                layer: str, tiff: bool, draw: bool = True) -> dict[str, Any]:
    from explain_cli.slides.tissue import tissue_mask

    ident = info["id"]
    folder = slide_dir(out_dir, ident)
    maps = stitch(info, rows)
    entry: dict[str, Any] = {
        "id": ident, "rel": info["rel"], "kind": info["kind"], "dimensions": info["dimensions"], "mpp": info.get("mpp"),
        "tiles_total": info["tiles_total"], "tiles_no_tissue": info["tiles_no_tissue"],
        "tiles_kept": info["tiles_kept"], "tiles_explained": len(maps.tiles), "tiles_failed": failed,
        "classes": [], "top_by_probability": {}, "top_by_attribution": {},
    }
    if not info["tiles_kept"]:
        entry["warning"] = "no tile with enough tissue: nothing explained"
    thumb = _thumbnail(info, {rel: (t["x"], t["y"]) for rel, t in maps.tiles.items()}) if draw else None
    if thumb is not None:
        atomic_write_bytes(folder / "thumbnail.png", _png(thumb))
        if info["kind"] == "file":
            mask = tissue_mask(np.asarray(thumb.convert("RGB")))
            atomic_write_bytes(folder / "tissue.png", _png(Image.fromarray((mask * 255).astype(np.uint8))))
    if draw:
        atomic_write_bytes(folder / "maps.npz", _npz_bytes(maps, info))
    skipped = info["tiles_no_tissue"]
    for k, name in enumerate(maps.classes):
        stem = safe_name(name)
        n_class = sum(1 for t in maps.tiles.values() if name in t["classes"])
        caption = (f"{ident}  \u00b7  {explainer} explainer, layer {layer}  \u00b7  {n_class} of {info['tiles_total']} "
                   f"tiles explained for this class ({skipped} without tissue)")
        if draw:
            atomic_write_bytes(folder / f"heatmap-{stem}.png", _figure(
                thumb, maps.attribution[k], info, f"{ident}: SHAP for '{name}'", caption, "attribution"))
            atomic_write_bytes(folder / f"probability-{stem}.png", _figure(
                thumb, maps.probability[k], info, f"{ident}: probability of '{name}'", caption, "probability"))
            if tiff:
                write_tiff(folder / f"heatmap-{stem}.tiff", maps.attribution[k], info)
        with_class = [(rel, t["classes"][name]) for rel, t in maps.tiles.items() if name in t["classes"]]
        entry["classes"].append({"name": name, "index": maps.class_index[k], "heatmap": f"heatmap-{stem}.png",
                                 "probability": f"probability-{stem}.png", "tiles": n_class})
        entry["top_by_probability"][name] = [
            {"image": rel, "x": maps.tiles[rel]["x"], "y": maps.tiles[rel]["y"], "probability": c["probability"]}
            for rel, c in sorted(with_class, key=lambda rc: (-rc[1]["probability"], rc[0]))[:TOP_TILES]]
        entry["top_by_attribution"][name] = [
            {"image": rel, "x": maps.tiles[rel]["x"], "y": maps.tiles[rel]["y"], "attribution": c["attribution"]}
            for rel, c in sorted(with_class, key=lambda rc: (-rc[1]["attribution"], rc[0]))[:TOP_TILES]]
    return entry


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()
