"""The Slides section (server-side HTML from slides/index.json, every value escaped)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from explain_cli import names
from explain_cli.report.outputs import RunOutputs, _number, _read_json
from explain_cli.report.summary import _e

#: Heatmaps shown per slide card; a slide's other classes are behind a "more classes" toggle.
SLIDE_CLASSES_SHOWN = 4


def _read_slides(output_dir: Path) -> list[dict[str, Any]]:
    """The entries of slides/index.json (a slide run's summary), [] when there is none or it is unreadable."""
    path = output_dir / "slides" / "index.json"
    if not path.is_file():
        return []
    data = _read_json(path)
    slides = data.get("slides") if data else None
    return [s for s in slides if isinstance(s, dict) and s.get("id")] if isinstance(slides, list) else []


def _slide_file_url(output_dir: Path, ident: str, name: Any) -> str | None:
    """slides/<id>/<name> as a relative, percent-encoded URL; None when the file is missing or the
    names would leave slides/<id> (index.json is data: a '..' in it must not point elsewhere)."""
    if not isinstance(name, str) or not name:
        return None
    parts = ident.split("/") + [name]
    seps = {os.sep, os.altsep} - {None, "/"}  # a backslash separates only on Windows
    if any(p in ("", ".", "..") or any(sep in p for sep in seps) for p in parts) or "/" in name:
        return None
    if not (output_dir / "slides" / ident / name).is_file():
        return None
    return "slides/" + quote(os.fsencode("/".join(parts)), safe="/")


def _tile_link(tile: dict[str, Any], rel: str, key: str, rows: dict[str, str]) -> str:
    """One top tile: its name (short: without the slide's prefix) linking to its table row, and its value."""
    image = str(tile.get("image", ""))
    short = image[len(rel) + 1:] if rel and image.startswith(rel + "/") else image
    value = _number(tile.get(key))
    shown = "" if value is None else (f"{value:.3f}" if key == "probability" else f"{value:.3g}")
    where = f"x {tile.get('x')}, y {tile.get('y')} (level-0 pixels)" if "x" in tile else image
    row = rows.get(image)
    if row is None:  # not in topk.csv (e.g. a shard's report): named, not linked
        name = f'<span class="file" title="{_e(where)}">{_e(short)}</span>'
    else:
        name = (f'<a class="file tile" href="#image={quote(row, safe="")}" title="{_e(image)}: {_e(where)}; '
                f'show its row in the table">{_e(short)}</a>')
    return f'<li>{name}<span class="v">{_e(shown)}</span></li>'


def _slide_picture(heatmap: str | None, name: str, ident: str) -> str:
    """The class's heatmap as a link to the full figure, or a note that it was not drawn."""
    if not heatmap:
        return '<span class="map muted">heatmap not drawn (no slides/&lt;id&gt;/heatmap-*.png)</span>'
    return (f'<a class="map" href="{_e(heatmap)}" target="_blank" rel="noopener" title="open the full heatmap">'
            f'<img loading="lazy" decoding="async" src="{_e(heatmap)}" '
            f'alt="SHAP heatmap of {_e(name)} on {_e(ident)}"></a>')


def _class_links(cls: dict[str, Any], heatmap: str | None, probability: str | None) -> list[str]:
    """The caption's '12 tile(s) · heatmap · probability map'."""
    tiles = _number(cls.get("tiles"))
    links = [f"{int(tiles):,} tile(s)" if tiles is not None else ""]
    if heatmap:
        links.append(f'<a href="{_e(heatmap)}" target="_blank" rel="noopener">heatmap</a>')
    if probability:
        links.append(f'<a href="{_e(probability)}" target="_blank" rel="noopener">probability map</a>')
    return links


def _top_tiles(entry: dict[str, Any], name: str, rel: str, rows: dict[str, str]) -> list[str]:
    """The class's top tiles by probability and by attribution, each a list linking to the table rows."""
    tops = []
    for key, title in (("probability", "Top tiles by probability"), ("attribution", "Top tiles by attribution")):
        listed = (entry.get(f"top_by_{key}") or {}).get(name) if isinstance(entry.get(f"top_by_{key}"), dict) else None
        items = "".join(_tile_link(t, rel, key, rows) for t in listed or [] if isinstance(t, dict))
        tip = ("the tile's softmax probability of the class" if key == "probability"
               else "the tile's SHAP values for the class, summed over the tile")
        tops.append(f'<div class="top"><h4 title="{_e(tip)}">{title}</h4>'
                    + (f"<ol>{items}</ol>" if items else '<p class="muted">none</p>') + "</div>")
    return tops


def _slide_class_html(output_dir: Path, entry: dict[str, Any], cls: dict[str, Any], rows: dict[str, str]) -> str:
    ident, rel, name = str(entry["id"]), str(entry.get("rel") or ""), str(cls.get("name", ""))
    heatmap = _slide_file_url(output_dir, ident, cls.get("heatmap"))
    probability = _slide_file_url(output_dir, ident, cls.get("probability"))
    links = _class_links(cls, heatmap, probability)
    return (f'<div class="slide-class"><figure>{_slide_picture(heatmap, name, ident)}<figcaption><b>{_e(name)}</b> '
            f'{" &middot; ".join(x for x in links if x)}</figcaption></figure>'
            f'{"".join(_top_tiles(entry, name, rel, rows))}</div>')


def _slide_about(entry: dict[str, Any]) -> list[str]:
    """'4096 × 3072 px', '0.5 µm/px' (or 'no MPP in the slide'), 'pre-tiled' or 'slide file'."""
    dims = entry.get("dimensions")
    about = []
    if isinstance(dims, list) and len(dims) == 2:
        about.append(f"{_e(dims[0])} &times; {_e(dims[1])} px")
    mpp = _number(entry.get("mpp"))
    about.append(f"{mpp:g} &micro;m/px" if mpp is not None else "no MPP in the slide")
    about.append("pre-tiled" if entry.get("kind") == "tiles" else "slide file")
    return about


def _slide_stats(entry: dict[str, Any]) -> list[str]:
    """The tile counts: explained (of those with tissue), skipped for no tissue, failed, in all."""
    count = {k: int(_number(entry.get(k)) or 0) for k in
             ("tiles_total", "tiles_no_tissue", "tiles_kept", "tiles_explained", "tiles_failed")}
    kept = f" of {count['tiles_kept']:,} with tissue" if count["tiles_kept"] != count["tiles_explained"] else ""
    return [f'<span class="n">{count["tiles_explained"]:,}</span> tiles explained{kept}',
            f'<span class="n">{count["tiles_no_tissue"]:,}</span> skipped for no tissue',
            f'<span class="n{" bad" if count["tiles_failed"] else ""}">{count["tiles_failed"]:,}</span> failed',
            f'{count["tiles_total"]:,} in all']


def _table_link(rel: str, rows: dict[str, str]) -> str:
    """' · its 12 tile(s) in the table' (filtering the table to the slide), '' when none is there."""
    in_table = sum(1 for image in rows if image.startswith(rel + "/"))
    return (f' &middot; <a href="#q={quote(rel + "/", safe="")}" title="filter the table to this slide\'s tiles">'
            f'its {in_table:,} tile(s) in the table</a>' if in_table else "")


def _slide_classes(output_dir: Path, entry: dict[str, Any], rows: dict[str, str]) -> str:
    """Per explained class (most tiles first) its heatmap and top tiles; past SLIDE_CLASSES_SHOWN folded."""
    classes = sorted((c for c in entry.get("classes") or [] if isinstance(c, dict) and c.get("name") is not None),
                     key=lambda c: -(_number(c.get("tiles")) or 0))
    if not classes:
        return '<p class="muted">No heatmap: no tile of this slide was explained.</p>'
    body = "".join(_slide_class_html(output_dir, entry, c, rows) for c in classes[:SLIDE_CLASSES_SHOWN])
    if len(classes) > SLIDE_CLASSES_SHOWN:
        more = classes[SLIDE_CLASSES_SHOWN:]
        body += (f'<details><summary>{len(more)} more class(es)</summary>'
                 + "".join(_slide_class_html(output_dir, entry, c, rows) for c in more) + "</details>")
    return body


def _slide_files(output_dir: Path, ident: str) -> list[str]:
    """Links to the slide's thumbnail, tissue mask and maps.npz, those that exist."""
    return [f'<a href="{_e(u)}" target="_blank" rel="noopener">{label}</a>' for u, label in (
        (_slide_file_url(output_dir, ident, "thumbnail.png"), "thumbnail"),
        (_slide_file_url(output_dir, ident, "tissue.png"), "tissue mask"),
        (_slide_file_url(output_dir, ident, "maps.npz"), "maps.npz")) if u]


def _slide_card(output_dir: Path, entry: dict[str, Any], rows: dict[str, str]) -> str:
    """One slide: its size, its tile counts, a warning when nothing was explained, then per class
    the heatmap (a link to the full figure) and its top tiles (links to their table rows)."""
    ident, rel = str(entry["id"]), str(entry.get("rel") or entry["id"])
    warning = f'<p class="slide-warning">{_e(entry["warning"])}</p>' if entry.get("warning") else ""
    extra = _slide_files(output_dir, ident)
    return (f'<article class="slide" data-slide="{_e(ident)}"><h3 class="file">{_e(rel)}</h3>'
            f'<div class="muted">{" &middot; ".join(_slide_about(entry))}'
            + (f' &middot; {" &middot; ".join(extra)}' if extra else "") + _table_link(rel, rows) + "</div>"
            f'<div class="slide-tiles">{" &middot; ".join(_slide_stats(entry))}</div>{warning}'
            f'{_slide_classes(output_dir, entry, rows)}</article>')


def _slides_html(outputs: RunOutputs, images: list[dict[str, Any]]) -> str:
    """The Slides section ('' for a run without slides/index.json): one card per slide."""
    slides = _read_slides(outputs.output_dir)
    if not slides:
        return ""
    rows = {names.unescape(im["f"]): im["f"] for im in images}  # index.json names tiles unescaped
    warned = sum(1 for s in slides if s.get("warning"))
    note = f' <span class="count bad">{warned:,} without a tile explained</span>' if warned else ""
    return (f'<section id="slides"><h2>Slides <span class="count">{len(slides):,}</span>{note}</h2>'
            '<p class="muted">Per slide and explained class: the tiles\' SHAP values stitched over the slide '
            "(click for the full figure), and the tiles with the highest probability and attribution "
            "(click one to see its row in the table below).</p>"
            + "".join(_slide_card(outputs.output_dir, s, rows) for s in slides) + "</section>")
