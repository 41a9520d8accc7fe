"""The image table's data: one JSON entry per image (its overlay URL, explained classes and their
numbers), embedded in the page and rendered by page.js one page of rows at a time."""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path
from typing import Any
from urllib.parse import quote

from explain_cli import names
from explain_cli.report.outputs import RunOutputs, _number

_HIDDEN = {"image", "rank", "class_index", "class_name", "output", "base_value", "shap_sum", "target",
           "explained", "label", "predicted", "slide", "x", "y", "mpp", "cells"}

# Known numeric columns: (key, label, tooltip, number format, which direction is better).
_KNOWN = [
    ("probability", "Probability", "softmax probability of the class", "prob", "high"),
    ("additivity_error", "Additivity error", "|shap_sum - (output - base_value)|: how far the "
     "attributions are from summing to the explained output", "sci", "low"),
    ("stability", "Stability", "reliability of the map (split-half, Spearman-Brown corrected; kernel: from the "
     "variance of its values): the expected correlation with a rerun at another seed; below 0.5 the map is mostly "
     "noise", "fixed2", "high"),
    ("deletion_auc", "Deletion AUC", "probability of the class as the most-attributed pixels are "
     "removed first (area under the curve): lower is more faithful", "fixed3", "low"),
    ("insertion_auc", "Insertion AUC", "probability of the class as the most-attributed pixels are "
     "added first to the baseline (area under the curve): higher is more faithful", "fixed3", "high"),
    ("nsamples_used", "Samples", "model evaluations the map took (explainer.nsamples; with 'auto', until "
     "the map reached target_stability): marked when the image hit max_nsamples first", "auto", ""),
]



def _overlay_url(rel: str, fmt: str, overlays: set[str]) -> str | None:
    """The overlay of image ``rel`` as a relative, percent-encoded URL (None when absent).

    ``rel`` is the CSV's (escaped) name; the overlay is named by ``names.output_stem`` (the
    path with its extension, hashed on a case-insensitive file system), or by explain-cli 0.1's
    path without extension; each is tried, in either format. The URL percent-encodes the file's
    bytes, so a name that is not UTF-8 still links to its file."""
    real = names.unescape(rel)
    stems = dict.fromkeys(names.fs_name(s) for s in (names.output_stem(real), names.output_stem(real, True),
                                                    posixpath.splitext(real)[0]))
    for ext in dict.fromkeys([fmt, "svg", "png"]):
        for stem in stems:
            name = f"{stem}.{ext}"
            if name in overlays:
                return "overlays/" + quote(os.fsencode(name), safe="/")
    return None


def _list_overlays(output_dir: Path) -> set[str]:
    root = output_dir / "overlays"
    found: set[str] = set()
    for folder, _, files in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found.update(prefix + f for f in files if not f.startswith("."))
    return found


def _sample_cap(outputs: RunOutputs) -> float | None:
    """``explainer.max_nsamples`` when the run sampled with ``nsamples: auto`` (a row that used that
    many samples stopped at the cap, not at the target stability), else None."""
    run = outputs.run or (outputs.shards[0][1] if outputs.shards else {})
    config = run.get("config") or {}  # a mapping or absent (RunRecord)
    explainer = config.get("explainer") if isinstance(config.get("explainer"), dict) else {}
    if explainer.get("nsamples") != "auto":
        return None
    return _number(explainer.get("max_nsamples"))


def _columns(outputs: RunOutputs) -> list[dict[str, Any]]:
    """The numeric per-class columns to show: the known ones present, then any other numeric column."""
    cols = []
    present = set(outputs.topk_columns)
    for key, label, title, fmt, better in _KNOWN:
        if key in present and (key in ("probability", "additivity_error")
                               or any(_number(r.get(key)) is not None for r in outputs.topk)):
            if key == "nsamples_used":  # shown for nsamples auto, or when the counts differ
                cap = _sample_cap(outputs)
                counts = {_number(r.get(key)) for r in outputs.topk} - {None}
                if cap is None and len(counts) < 2:
                    continue
            cols.append({"key": key, "label": label, "title": title, "fmt": fmt, "better": better})
            if key == "nsamples_used" and cap is not None:
                cols[-1]["warn_at"] = cap
    known = {k for k, *_ in _KNOWN} | _HIDDEN
    for key in outputs.topk_columns:
        if key not in known and any(_number(r.get(key)) is not None for r in outputs.topk):
            cols.append({"key": key, "label": key.replace("_", " "), "title": f"topk.csv column {key}",
                         "fmt": "auto", "better": ""})
    return cols


def _rank(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 1 << 30


def _table_data(outputs: RunOutputs, fmt: str) -> dict[str, Any]:
    """One entry per image: file, overlay URL, the explained classes in the asked order (topk.csv's
    order) with their ranks and why each was explained, the image's label and predicted class (when the
    run has them), and each column's values."""
    cols = _columns(outputs)
    overlays = _list_overlays(outputs.output_dir)
    by_image: dict[str, list[dict[str, str]]] = {}
    for row in outputs.topk:
        image = row.get("image")
        if image:
            by_image.setdefault(image, []).append(row)
    images = []
    has_targets = "target" in outputs.topk_columns
    for image, rows in by_image.items():
        if not has_targets:  # an older run: its rows are the top k, in rank order
            rows.sort(key=lambda r: _rank(r.get("rank", "")))
        entry = {
            "f": image,
            "u": _overlay_url(image, fmt, overlays),
            "c": [r.get("class_name") or f"class {r.get('class_index', '?')}" for r in rows],
            "r": [_rank(r.get("rank", "")) if r.get("rank") else None for r in rows],
            "t": [r.get("target") or "" for r in rows],
            "v": [[_number(r.get(c["key"])) for r in rows] for c in cols],
        }
        if rows[0].get("label"):
            entry["l"] = rows[0]["label"]
        if rows[0].get("predicted"):
            entry["p"] = rows[0]["predicted"]
        images.append(entry)
    return {"columns": cols, "images": images}


def _script_json(data: Any) -> str:
    """JSON that is safe inside <script>: no '<', '>' or '&' (so no '</script>' or '<!--') and no
    U+2028/2029, all replaced by their \\u escapes, which JSON.parse reads back unchanged."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch in "<>&\u2028\u2029":
        text = text.replace(ch, f"\\u{ord(ch):04x}")
    return text
