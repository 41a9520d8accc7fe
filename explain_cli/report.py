"""``report.html``: one self-contained page to browse a run's output folder.

Built only from what a run leaves in ``output.dir`` (``run.json`` or ``run.shard-*.json``,
``topk.csv`` or the shards' ``topk.shard-*.csv``, ``errors.csv``, ``overlays/``), so it works the
same at the end of a run, after ``merge`` and by ``explain-cli report OUTPUT_DIR``.

Why it looks the way it does:

* Nothing is loaded from the network: CSS and JS are inline, and a Content-Security-Policy
  allows only that one script (by its hash), inline styles and same-folder images.
* It stays responsive with thousands of images: the table is rendered by the script from an
  embedded JSON array, one page of rows at a time, and thumbnails are ``<img loading="lazy">``
  pointing at the overlay files (relative, percent-encoded URLs), never inlined SVGs.
* Class and file names are data, never markup: the summary is escaped with ``html.escape``,
  the embedded JSON escapes ``<``, ``>``, ``&`` and U+2028/2029 (so ``</script>`` in a label
  cannot end the script), and the script builds rows with ``textContent`` and DOM properties only.
* Optional columns and keys (``stability``, ``deletion_auc``, ``insertion_auc``, other numeric
  columns, ``metrics.random_reference`` in run.json) are shown when present and ignored when not.
* The page has no timestamp of its own: the same folder gives the same bytes.

This module does not import torch or numpy.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import logging
import math
import os
import posixpath
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from explain_cli import __version__
from explain_cli.errors import UserError
from explain_cli import names
from explain_cli.write import atomic_write_text, parse_csv, read_csv_text

log = logging.getLogger("explain_cli")

REPORT_NAME = "report.html"

_SHARD = re.compile(r"^(topk|errors|run)\.shard-(\d+)-of-(\d+)\.(csv|json)$")

# topk.csv columns that are not shown as their own column (identity, raw model numbers, a slide tile's place).
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


@dataclass
class RunOutputs:
    """What a run left in its output folder, read defensively (missing parts are empty)."""

    output_dir: Path
    run: dict[str, Any] | None = None
    shards: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    topk_files: list[str] = field(default_factory=list)
    topk: list[dict[str, str]] = field(default_factory=list)
    topk_columns: list[str] = field(default_factory=list)
    errors: list[dict[str, str]] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("report: cannot read %s (%s); left out", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows; a torn last line (a run still appending) is dropped."""
    try:
        rows = parse_csv(read_csv_text(path))  # newline='': quoted CRs in names survive
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("report: cannot read %s (%s); left out", path, exc)
        return [], []
    if not rows:
        return [], []
    header = rows[0]
    return header, [dict(zip(header, r)) for r in rows[1:] if r]


def _shard_files(output_dir: Path, kind: str) -> list[Path]:
    found = []
    for path in output_dir.iterdir():
        m = _SHARD.match(path.name)
        if m and m.group(1) == kind and path.is_file():
            found.append((int(m.group(3)), int(m.group(2)), path))
    return [p for _, _, p in sorted(found)]


def load_outputs(output_dir: Path) -> RunOutputs:
    """Read the run outputs of ``output_dir``; UserError if there are none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"report: not a folder: {output_dir}")
    out = RunOutputs(output_dir)
    run_json = output_dir / "run.json"
    topk_csv = output_dir / "topk.csv"
    shard_runs = _shard_files(output_dir, "run")
    shard_topk = _shard_files(output_dir, "topk")
    if not (run_json.exists() or topk_csv.exists() or shard_runs or shard_topk):
        raise UserError(f"report: no run outputs in {output_dir} (no run.json, topk.csv or shard files); "
                        f"run `explain-cli run CONFIG` with output.dir there first")
    if run_json.exists():
        out.run = _read_json(run_json)
    for path in shard_runs:
        info = _read_json(path)
        if info is not None:
            out.shards.append((path.name, info))
    # A merged or unsharded run's topk.csv is the whole result; otherwise show the shards' files.
    topk_paths = [topk_csv] if topk_csv.exists() else shard_topk
    errors_csv = output_dir / "errors.csv"
    error_paths = [errors_csv] if topk_csv.exists() or errors_csv.exists() else _shard_files(output_dir, "errors")
    for path in topk_paths:
        header, rows = _read_csv(path)
        out.topk_files.append(path.name)
        out.topk.extend(rows)
        out.topk_columns += [c for c in header if c not in out.topk_columns]
    for path in error_paths:
        if path.exists():
            out.errors.extend(_read_csv(path)[1])
    return out


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


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
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
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


# --- summary (server-side HTML, every value escaped) -------------------------------------------

def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_seconds(value: Any) -> str:
    s = _number(value)
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def _flatten(prefix: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value if isinstance(value, str) else json.dumps(value, default=str)))


def _kv_table(rows: list[tuple[str, Any]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _card(label: str, value: str, note: str = "", tone: str = "") -> str:
    shown = _e(value)
    if not re.fullmatch(r"[\d.,:% hminus-]*", value):
        tone = f"{tone} text".strip()
        shown = re.sub(r"([:/])", r"\1<wbr>", shown)  # long model names break after : and /
    note_html = f'<div class="note">{_e(note)}</div>' if note else ""
    return f'<div class="card {tone}"><div class="label">{_e(label)}</div><div class="value">{shown}</div>{note_html}</div>'


def _random_reference(outputs: RunOutputs) -> dict[str, float]:
    """metrics.random_reference of run.json, or the image-weighted mean over the shards' run.json."""
    def ref_of(info: dict[str, Any] | None) -> dict[str, float]:
        metrics = info.get("metrics") if isinstance(info, dict) else None
        ref = metrics.get("random_reference") if isinstance(metrics, dict) else None
        if not isinstance(ref, dict):
            return {}
        return {k: v for k, v in ((k, _number(v)) for k, v in ref.items()) if v is not None}

    top = ref_of(outputs.run)
    if top:
        return top
    sums: dict[str, list[float]] = {}
    for _, info in outputs.shards:
        counts = info.get("counts") if isinstance(info.get("counts"), dict) else {}
        weight = _number(counts.get("explained")) or 1.0
        for k, v in ref_of(info).items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += v * weight
            acc[1] += weight
    return {k: s / w for k, (s, w) in sums.items() if w}


def _runs(run: dict[str, Any]) -> list[dict[str, Any]]:
    runs = run.get("runs")
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _runs_note(run: dict[str, Any]) -> str:
    """'the last of 3 runs (4.2 s in all); ' when run.json holds several run records."""
    runs = _runs(run)
    if len(runs) < 2:
        return ""
    total = sum(s for s in (_number(r.get("seconds")) for r in runs) if s is not None)
    return f"the last of {len(runs)} runs ({_fmt_seconds(total)} in all); "


def _runs_table(run: dict[str, Any]) -> str:
    """Every run into this folder (run.json ``runs``), newest last."""
    runs = _runs(run)
    if not runs:
        return ""
    head = ("<tr><th>started</th><th>finished</th><th>status</th><th>exit</th><th>explained</th>"
            "<th>already done</th><th>failed</th><th>excluded</th><th>time</th><th>host</th><th>shard</th></tr>")
    body = []
    for r in runs:
        counts = r.get("counts") if isinstance(r.get("counts"), dict) else {}
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            r.get("started"), r.get("finished"), r.get("status"), r.get("exit_code"), counts.get("explained"),
            counts.get("already_done"), counts.get("failed"), counts.get("excluded"),
            _fmt_seconds(r.get("seconds")), r.get("host"), r.get("shard"))) + "</tr>")
    return f'<h3>Runs into this folder</h3><table class="grid runs">{head}{"".join(body)}</table>'


def _weights_note(run: dict[str, Any]) -> str:
    """Which weights ran (run.json ``weights``): 'pretrained weights', 'random weights', ..."""
    weights = run.get("weights") if isinstance(run.get("weights"), dict) else {}
    kind = weights.get("kind")
    return {"factory": "the factory's weights"}.get(kind, f"{kind} weights") if kind else "weights not recorded"


def _status(outputs: RunOutputs) -> tuple[str, str]:
    """(badge text, tone) for the header."""
    run = outputs.run
    if run and run.get("merged"):
        return f"merged from {run.get('shards', len(outputs.shards))} shards", "ok"
    if run:
        status = str(run.get("status", "unknown"))
        if status == "interrupted":
            return f"interrupted by {run.get('interrupted_by') or 'a signal'}: rerun to resume", "warn"
        return status, "ok" if status == "complete" else "warn"
    counts = {info.get("shard", {}).get("count") for _, info in outputs.shards if isinstance(info.get("shard"), dict)}
    total = max((c for c in counts if isinstance(c, int)), default=len(outputs.shards))
    done = sum(1 for _, info in outputs.shards if info.get("status") == "complete")
    return f"sharded, not merged: {done} of {total} shards complete (then: explain-cli merge)", "warn"


def _summary_html(outputs: RunOutputs, images: list[dict[str, Any]], columns: list[dict[str, Any]]) -> str:
    run = outputs.run or (outputs.shards[0][1] if outputs.shards else {})
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    explainer = config.get("explainer") if isinstance(config.get("explainer"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    infos = [run] if outputs.run and not outputs.run.get("merged") else [i for _, i in outputs.shards]
    if not infos and outputs.run:
        infos = [outputs.run]

    failed = len({r.get("image") for r in outputs.errors if r.get("image")})
    seconds = [s for s in (_number(i.get("seconds")) for i in infos) if s is not None]
    total_s = sum(seconds) if seconds else _number(run.get("shard_seconds_total"))
    explained_now = sum(int(_number((i.get("counts") or {}).get("explained")) or 0) for i in infos
                        if isinstance(i.get("counts"), dict))
    rate = ""
    if total_s and explained_now:
        per_s = explained_now / total_s
        rate = f"{per_s:.2f} images/s" if per_s >= 1 else f"{total_s / explained_now:.1f} s per image"
    started = [str(i["started"]) for i in infos if i.get("started")]
    if started:
        rate += ("; " if rate else "") + "started " + min(started).replace("T", " ").replace("+00:00", " UTC")
    devices = sorted({str(i.get("device_name") or i.get("device")) for i in infos
                      if i.get("device_name") or i.get("device")})
    device_note = ", ".join(sorted({str(i.get("device")) for i in infos if i.get("device")}))
    already = sum(int(_number((i.get("counts") or {}).get("already_done")) or 0) for i in infos
                  if isinstance(i.get("counts"), dict))
    # input.exclude applies to the whole folder: every shard counts the same files
    excluded = max((int(_number((i.get("counts") or {}).get("excluded")) or 0) for i in infos
                    if isinstance(i.get("counts"), dict)), default=0)
    cards = [
        _card("Images explained", f"{len(images):,}", "; ".join(n for n in (
            f"{already:,} of them from an earlier run" if already else "",
            f"{excluded:,} skipped by input.exclude" if excluded else "") if n)),
        _card("Failed", f"{failed:,}", "see Failed images below" if failed else "", "bad" if failed else ""),
        _card("Time", _fmt_seconds(total_s), ("summed over shards; " if len(infos) > 1 else "")
              + _runs_note(run) + rate),
        _card("Device", ", ".join(devices) or "-", device_note),
        _card("Explainer", str(explainer.get("name", "-")),
              ", ".join(f"{k} {v}" for k, v in explainer.items() if k != "name" and not isinstance(v, dict))),
        _card("Model", str(model.get("arch", "-")), f"layer {model.get('layer', 'input')}; {_weights_note(run)}",
              "warn" if _weights_note(run) == "random weights" else ""),
    ]
    ref = _random_reference(outputs)
    for col in columns:
        key = col["key"]
        if key == "nsamples_used" and col.get("warn_at") is not None:
            i = columns.index(col)
            used = [img["v"][i][0] for img in images if img["v"][i] and img["v"][i][0] is not None]
            hit = sum(1 for v in used if v >= col["warn_at"])
            if used:
                cards.append(_card("Samples (auto)", f"{statistics.median(used):.0f}",
                                   f"median per image; {hit} image(s) hit max_nsamples {col['warn_at']:.0f} before "
                                   "target_stability" if hit else "median per image; every map reached target_stability",
                                   "warn" if hit else ""))
            continue
        if key not in ("stability", "deletion_auc", "insertion_auc"):
            continue
        i = columns.index(col)
        values = [img["v"][i][0] for img in images if img["v"][i] and img["v"][i][0] is not None]
        if not values:
            continue
        median = statistics.median(values)
        if key == "stability":
            note = "median over top-1 classes; below 0.5: raise explainer.nsamples"
            tone = "warn" if median < 0.5 else ""
        else:
            better = "lower" if key == "deletion_auc" else "higher"
            note = f"median, top-1 classes ({better} is better)"
            if key in ref:
                note += f"; random pixel order: {ref[key]:.3f}"
            tone = ""
        cards.append(_card(f"{col['label']}", f"{median:.3f}" if key != "stability" else f"{median:.2f}", note, tone))
    trained = run.get("explainer_training") if isinstance(run.get("explainer_training"), dict) else {}
    r = trained.get("kernel_median_pearson")
    if isinstance(r, (int, float)) and not isinstance(r, bool):  # an amortized explainer's own check
        cards.append(_card("Explainer vs Kernel SHAP", f"{r:.2f}",
                           f"median Pearson r of the trained explainer's maps and Kernel SHAP's on "
                           f"{trained.get('kernel_images')} held-out image(s), {trained.get('kernel_nsamples')} "
                           f"samples each (explain-cli train); below 0.5 the maps are a rough guide at best",
                           "warn" if r < 0.5 else ""))

    settings: list[tuple[str, str]] = []
    _flatten("", config, settings)
    versions = run.get("versions") if isinstance(run.get("versions"), dict) else {}
    about = [(k, v) for k, v in (
        ("status", run.get("status")), ("started", run.get("started")), ("finished", run.get("finished")),
        ("seconds", run.get("seconds") if run.get("seconds") is not None else run.get("shard_seconds_total")),
        ("counts", json.dumps(run.get("counts")) if run.get("counts") is not None else None),
        ("images found", run.get("images_found")), ("limit", run.get("limit")),
        ("host", run.get("host")), ("torch threads", run.get("torch_threads")),
        ("peak GPU memory (MB)", run.get("peak_gpu_memory_mb")),
        ("config file", run.get("config_file")),
        ("command", " ".join(map(str, run["command"])) if isinstance(run.get("command"), list) else run.get("command")),
        ("read from", ", ".join(["run.json"] if outputs.run else []) + (", " if outputs.run and outputs.shards else "")
         + ", ".join(n for n, _ in outputs.shards) + "; " + ", ".join(outputs.topk_files)),
    ) if v is not None and v != ""]
    if ref:
        about.append(("random-order reference", ", ".join(f"{k} {v:.4g}" for k, v in ref.items())))
    shard_rows = ""
    if outputs.shards:
        head = "<tr><th>file</th><th>status</th><th>host</th><th>device</th><th>explained</th><th>failed</th><th>time</th><th>finished</th></tr>"
        body = []
        for name, info in outputs.shards:
            counts = info.get("counts") if isinstance(info.get("counts"), dict) else {}
            body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
                name, info.get("status"), info.get("host"), info.get("device_name") or info.get("device"),
                counts.get("explained"), counts.get("failed"), _fmt_seconds(info.get("seconds")),
                info.get("finished"))) + "</tr>")
        shard_rows = f'<h3>Shards</h3><table class="grid">{head}{"".join(body)}</table>'
    shard_rows += _runs_table(run)
    details = (
        '<details class="more"><summary>Run details, settings and versions</summary><div class="cols">'
        f'<div><h3>Run</h3>{_kv_table(about)}{shard_rows}</div>'
        f'<div><h3>Settings</h3>{_kv_table(settings)}</div>'
        f'<div><h3>Versions</h3>{_kv_table(list(versions.items()))}</div>'
        '</div></details>'
    )
    return f'<section class="cards">{"".join(cards)}</section>{details}'


def _errors_html(outputs: RunOutputs) -> str:
    if not outputs.errors:
        return '<section id="errors"><h2>Failed images</h2><p class="muted">None: every selected image was explained.</p></section>'
    rows = "".join(f"<tr><td class=\"file\">{_e(r.get('image'))}</td><td>{_e(r.get('error'))}</td></tr>"
                   for r in outputs.errors)
    n = len(outputs.errors)
    open_attr = " open" if n <= 20 else ""
    return (f'<section id="errors"><h2>Failed images <span class="count bad">{n:,}</span></h2>'
            f'<details{open_attr}><summary>{n:,} image(s) in errors.csv, with the reason</summary>'
            f'<table class="grid errors"><tr><th>image</th><th>error</th></tr>{rows}</table></details></section>')


# --- slides (server-side HTML from slides/index.json, every value escaped) ----------------------

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


def _slide_class_html(output_dir: Path, entry: dict[str, Any], cls: dict[str, Any], rows: dict[str, str]) -> str:
    ident, rel, name = str(entry["id"]), str(entry.get("rel") or ""), str(cls.get("name", ""))
    heatmap = _slide_file_url(output_dir, ident, cls.get("heatmap"))
    probability = _slide_file_url(output_dir, ident, cls.get("probability"))
    if heatmap:
        picture = (f'<a class="map" href="{_e(heatmap)}" target="_blank" rel="noopener" title="open the full heatmap">'
                   f'<img loading="lazy" decoding="async" src="{_e(heatmap)}" '
                   f'alt="SHAP heatmap of {_e(name)} on {_e(ident)}"></a>')
    else:
        picture = '<span class="map muted">heatmap not drawn (no slides/&lt;id&gt;/heatmap-*.png)</span>'
    tiles = _number(cls.get("tiles"))
    links = [f"{int(tiles):,} tile(s)" if tiles is not None else ""]
    if heatmap:
        links.append(f'<a href="{_e(heatmap)}" target="_blank" rel="noopener">heatmap</a>')
    if probability:
        links.append(f'<a href="{_e(probability)}" target="_blank" rel="noopener">probability map</a>')
    tops = []
    for key, title in (("probability", "Top tiles by probability"), ("attribution", "Top tiles by attribution")):
        listed = (entry.get(f"top_by_{key}") or {}).get(name) if isinstance(entry.get(f"top_by_{key}"), dict) else None
        items = "".join(_tile_link(t, rel, key, rows) for t in listed or [] if isinstance(t, dict))
        tip = ("the tile's softmax probability of the class" if key == "probability"
               else "the tile's SHAP values for the class, summed over the tile")
        tops.append(f'<div class="top"><h4 title="{_e(tip)}">{title}</h4>'
                    + (f"<ol>{items}</ol>" if items else '<p class="muted">none</p>') + "</div>")
    return (f'<div class="slide-class"><figure>{picture}<figcaption><b>{_e(name)}</b> '
            f'{" &middot; ".join(x for x in links if x)}</figcaption></figure>{"".join(tops)}</div>')


def _slide_card(output_dir: Path, entry: dict[str, Any], rows: dict[str, str]) -> str:
    """One slide: its size, its tile counts, a warning when nothing was explained, then per class
    the heatmap (a link to the full figure) and its top tiles (links to their table rows)."""
    ident, rel = str(entry["id"]), str(entry.get("rel") or entry["id"])
    count = {k: int(_number(entry.get(k)) or 0) for k in
             ("tiles_total", "tiles_no_tissue", "tiles_kept", "tiles_explained", "tiles_failed")}
    dims = entry.get("dimensions")
    about = []
    if isinstance(dims, list) and len(dims) == 2:
        about.append(f"{_e(dims[0])} &times; {_e(dims[1])} px")
    mpp = _number(entry.get("mpp"))
    about.append(f"{mpp:g} &micro;m/px" if mpp is not None else "no MPP in the slide")
    about.append("pre-tiled" if entry.get("kind") == "tiles" else "slide file")
    kept = f" of {count['tiles_kept']:,} with tissue" if count["tiles_kept"] != count["tiles_explained"] else ""
    stats = [f'<span class="n">{count["tiles_explained"]:,}</span> tiles explained{kept}',
             f'<span class="n">{count["tiles_no_tissue"]:,}</span> skipped for no tissue',
             f'<span class="n{" bad" if count["tiles_failed"] else ""}">{count["tiles_failed"]:,}</span> failed',
             f'{count["tiles_total"]:,} in all']
    warning = f'<p class="slide-warning">{_e(entry["warning"])}</p>' if entry.get("warning") else ""
    in_table = sum(1 for image in rows if image.startswith(rel + "/"))
    table_link = (f' &middot; <a href="#q={quote(rel + "/", safe="")}" title="filter the table to this slide\'s tiles">'
                  f'its {in_table:,} tile(s) in the table</a>' if in_table else "")
    classes = sorted((c for c in entry.get("classes") or [] if isinstance(c, dict) and c.get("name") is not None),
                     key=lambda c: -(_number(c.get("tiles")) or 0))
    body = "".join(_slide_class_html(output_dir, entry, c, rows) for c in classes[:SLIDE_CLASSES_SHOWN])
    if len(classes) > SLIDE_CLASSES_SHOWN:
        more = classes[SLIDE_CLASSES_SHOWN:]
        body += (f'<details><summary>{len(more)} more class(es)</summary>'
                 + "".join(_slide_class_html(output_dir, entry, c, rows) for c in more) + "</details>")
    if not classes:
        body = '<p class="muted">No heatmap: no tile of this slide was explained.</p>'
    thumb = _slide_file_url(output_dir, ident, "thumbnail.png")
    extra = [f'<a href="{_e(u)}" target="_blank" rel="noopener">{label}</a>' for u, label in (
        (thumb, "thumbnail"), (_slide_file_url(output_dir, ident, "tissue.png"), "tissue mask"),
        (_slide_file_url(output_dir, ident, "maps.npz"), "maps.npz")) if u]
    return (f'<article class="slide" data-slide="{_e(ident)}"><h3 class="file">{_e(rel)}</h3>'
            f'<div class="muted">{" &middot; ".join(about)}'
            + (f' &middot; {" &middot; ".join(extra)}' if extra else "") + table_link + "</div>"
            f'<div class="slide-tiles">{" &middot; ".join(stats)}</div>{warning}{body}</article>')


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


def build_report(output_dir: Path) -> str:
    """The page for ``output_dir`` as a string (UserError when it holds no run outputs)."""
    outputs = load_outputs(Path(output_dir))
    run = outputs.run or (outputs.shards[0][1] if outputs.shards else {})
    output_cfg = (run.get("config") or {}).get("output") if isinstance(run.get("config"), dict) else None
    fmt = str(output_cfg.get("format", "svg")) if isinstance(output_cfg, dict) else "svg"
    data = _table_data(outputs, fmt)
    data["reference"] = _random_reference(outputs)
    badge, tone = _status(outputs)
    name = Path(output_dir).resolve().name or str(output_dir)
    script = _SCRIPT
    script_hash = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    csp = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    return _PAGE.format(
        csp=_e(csp), title=_e(f"explain-cli report: {name}"), name=_e(name), version=_e(__version__),
        badge=_e(badge), tone=tone, summary=_summary_html(outputs, data["images"], data["columns"]),
        slides=_slides_html(outputs, data["images"]), errors=_errors_html(outputs), css=_CSS, data=_script_json(data), script=script,
    )


def write_report(output_dir: Path) -> Path:
    """Write ``output_dir/report.html`` atomically (left alone when unchanged); returns its path."""
    page = build_report(output_dir)
    path = Path(output_dir) / REPORT_NAME
    try:
        same = path.read_text(encoding="utf-8") == page
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        atomic_write_text(path, page)
    return path


def write_report_or_warn(output_dir: Path) -> Path | None:
    """write_report for the end of a run: a failure is a warning, never a failed run."""
    try:
        return write_report(output_dir)
    except Exception as exc:  # noqa: BLE001 - the report is a convenience; the run's outputs stand
        log.debug("report.html failed", exc_info=True)
        log.warning("could not write %s in %s: %s: %s", REPORT_NAME, output_dir, type(exc).__name__, exc)
        return None


_CSS = """
:root{--fg:#1f2933;--muted:#616e7c;--line:#e4e7eb;--bg:#f5f7fa;--card:#fff;--accent:#1e63c4;--ok:#1f7a4d;--warn:#b25e09;--bad:#c0262d}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#fff;border-bottom:1px solid var(--line);padding:14px 24px;display:flex;align-items:baseline;gap:14px;flex-wrap:wrap}
header h1{font-size:18px;margin:0;font-weight:600}
header .name{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:15px;color:var(--muted)}
.badge{font-size:12px;padding:2px 9px;border-radius:10px;background:#e6f4ec;color:var(--ok);font-weight:600}
.badge.warn{background:#fdf1e3;color:var(--warn)}
header .ver{margin-left:auto;color:var(--muted);font-size:12px}
main{padding:18px 24px 40px;max-width:1600px;margin:0 auto}
h2{font-size:16px;margin:26px 0 10px;font-weight:600}
h3{font-size:13px;margin:14px 0 6px;color:var(--muted);text-transform:uppercase;letter-spacing:.04em}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;min-width:0}
.card .label{font-size:12px;color:var(--muted)}
.card .value{font-size:20px;font-weight:600;overflow-wrap:anywhere}
.card .note{font-size:12px;color:var(--muted);overflow-wrap:anywhere}
.card.text .value{font-size:14.5px;line-height:1.9}
.card.bad .value{color:var(--bad)}.card.warn .value{color:var(--warn)}
details.more{margin-top:10px;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 14px}
details summary{cursor:pointer;color:var(--accent)}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:18px}
table.kv{border-collapse:collapse;width:100%;font-size:12.5px}
table.kv th{text-align:left;font-weight:500;color:var(--muted);padding:2px 12px 2px 0;white-space:nowrap;vertical-align:top}
table.kv td{padding:2px 0;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
table.grid{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
table.grid th,table.grid td{border-bottom:1px solid var(--line);padding:6px 10px;text-align:left;vertical-align:top}
.muted{color:var(--muted)}
.count{font-size:12px;padding:1px 8px;border-radius:10px;background:#e4e7eb;color:var(--fg);vertical-align:middle}
.count.bad{background:#fde8e8;color:var(--bad)}
.file{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;overflow-wrap:anywhere;white-space:pre-wrap}
.controls{display:flex;gap:10px;flex-wrap:wrap;align-items:center;margin:0 0 10px}
.controls input,.controls select,.controls button{font:inherit;padding:5px 9px;border:1px solid #cbd2d9;border-radius:6px;background:#fff}
.controls input{min-width:260px}
.controls .info{color:var(--muted);margin-left:auto}
.tablewrap{border:1px solid var(--line);border-radius:8px;background:#fff}
#images{border-collapse:collapse;width:100%}
#images th{position:sticky;top:0;background:#f9fafb;border-bottom:1px solid var(--line);padding:0;text-align:left;font-weight:600;font-size:12.5px;white-space:nowrap;z-index:1}
#images th button{all:unset;cursor:pointer;display:block;box-sizing:border-box;width:100%;padding:8px 10px}
#images th button:hover{color:var(--accent)}
#images th button:focus-visible{outline:2px solid var(--accent)}
#images th.sorted button{color:var(--accent)}
#images th.num button{text-align:right}
#images td.num div.low{color:var(--warn)}
#images th .ref{display:block;font-weight:400;color:var(--muted);font-size:11px}
#images td{border-bottom:1px solid var(--line);padding:6px 10px;vertical-align:top}
#images tr:hover td{background:#fafbfc}
#images td.thumb{padding:4px 8px;width:1%}
#images td.thumb a{display:block;line-height:0}
#images td.thumb img{height:104px;width:auto;min-width:60px;border-radius:4px;background:#f0f2f5}
#images td.thumb .muted{display:inline-block;line-height:1.35;width:150px;font-size:12px;padding:6px 0}
#images td.num{font-variant-numeric:tabular-nums;text-align:right;white-space:nowrap}
#images td.num div:first-child,#images td.cls div:first-child{font-weight:600}
#images td.cls div{white-space:nowrap}
#images td.cls div:not(:first-child),#images td.num div:not(:first-child){color:var(--muted)}
#images .rk{display:inline-block;width:1.4em;color:var(--muted);font-weight:400}
.pager{display:flex;gap:8px;align-items:center;justify-content:flex-end;margin-top:10px}
.pager button{font:inherit;padding:4px 12px;border:1px solid #cbd2d9;border-radius:6px;background:#fff;cursor:pointer}
.pager button:disabled{opacity:.4;cursor:default}
.empty{padding:30px;text-align:center;color:var(--muted)}
.confusion td,.confusion th{text-align:center}.confusion td.agree{background:#eaf6ef}.confusion button{font:inherit;border:0;background:none;color:var(--accent);cursor:pointer;text-decoration:underline}
td.lbl .ok{color:var(--ok)}td.lbl .bad{color:var(--bad)}.cls .tag{margin-left:6px;font-size:11px;padding:0 4px;border-radius:3px;background:#eef2f7;color:var(--muted)}
#images tr.marked td{background:#fff7d6}
#slides article{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:0 0 12px}
#slides article h3{margin:0 0 2px;text-transform:none;letter-spacing:0;color:var(--fg);font-size:14px}
#slides .slide-tiles{margin:4px 0 6px}#slides .slide-tiles .n{font-weight:600}#slides .slide-tiles .n.bad{color:var(--bad)}
#slides .slide-warning{margin:6px 0;padding:6px 10px;border-radius:6px;background:#fdf1e3;color:var(--warn);font-weight:600}
#slides .slide-class{display:grid;grid-template-columns:minmax(220px,340px) repeat(2,minmax(180px,1fr));gap:8px 18px;align-items:start;padding:8px 0;border-top:1px solid var(--line)}
#slides figure{margin:0}#slides a.map{display:block;line-height:0}
#slides a.map img{width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#f0f2f5}
#slides span.map{display:block;padding:20px 0}
#slides figcaption{font-size:12.5px;margin-top:4px}
#slides h4{margin:0 0 4px;font-size:12px;font-weight:500;color:var(--muted)}
#slides ol{margin:0;padding-left:22px;font-size:12.5px}
#slides li .v{margin-left:10px;color:var(--muted);font-variant-numeric:tabular-nums}
@media (max-width:1000px){.tablewrap{overflow-x:auto}}
@media (max-width:700px){#slides .slide-class{grid-template-columns:1fr}main{padding:12px}.controls input{min-width:0;flex:1}#images td.thumb img{height:56px}}
"""

_SCRIPT = """
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var cols = data.columns, images = data.images, ref = data.reference || {};
  var state = {sort: "file", dir: 1, cls: "", label: "", text: "", page: 0, size: 100};
  var el = function (id) { return document.getElementById(id); };
  function make(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function fmt(v, kind) {
    if (v === null || v === undefined) return "";
    if (kind === "prob") return v.toFixed(3);
    if (kind === "fixed2") return v.toFixed(2);
    if (kind === "fixed3") return v.toFixed(3);
    if (kind === "sci") return v === 0 ? "0" : (Math.abs(v) >= 0.01 && Math.abs(v) < 1000 ? v.toPrecision(3) : v.toExponential(1));
    return Math.abs(v) >= 0.01 && Math.abs(v) < 1e5 ? String(+v.toPrecision(4)) : v.toExponential(2);
  }
  // header
  var head = el("head-row");
  function th(key, label, title, extra, cls) {
    var cell = make("th", cls);
    cell.dataset.key = key;
    var b = make("button", "", label);
    if (title) b.title = title;
    b.type = "button";
    b.addEventListener("click", function () {
      if (state.sort === key) state.dir = -state.dir;
      else { state.sort = key; state.dir = (key === "file" || key === "class" || key === "label") ? 1 : -1; }
      state.page = 0; render();
    });
    cell.appendChild(b);
    if (extra) b.appendChild(make("span", "ref", extra));
    head.appendChild(cell);
  }
  head.appendChild(make("th", "", ""));
  th("file", "Image", "file name (relative to input.dir)");
  var hasLabels = images.some(function (im) { return im.l !== undefined; });
  if (hasLabels) th("label", "Label", "the image's label (targets.from_csv); \u2713 when the model's top class is the label");
  th("class", "Explained classes", "the explained classes in the asked order, each with its rank among all outputs (1 = the model's top class); sorts by the first");
  cols.forEach(function (c, i) {
    var extra = ref[c.key] !== undefined ? "random " + fmt(ref[c.key], c.fmt) : "";
    th(String(i), c.label, c.title + (c.better ? " (" + c.better + "er is better)" : "") + "; sorts by the top-1 class", extra, "num");
  });
  function predicted(im) { return im.p !== undefined ? im.p : im.c[0]; }
  // class filter: predicted (top-1) classes with their counts
  var counts = {};
  images.forEach(function (im) { var c = predicted(im); counts[c] = (counts[c] || 0) + 1; });
  var select = el("cls");
  Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a] || (a < b ? -1 : a > b ? 1 : 0); })
    .forEach(function (c) { var o = make("option", "", c + " (" + counts[c] + ")"); o.value = c; select.appendChild(o); });
  select.addEventListener("change", function () { state.cls = select.value; state.label = ""; state.page = 0; render(); });
  var text = el("q");
  text.addEventListener("input", function () { state.text = text.value.trim().toLowerCase(); state.page = 0; render(); });
  var size = el("size");
  size.addEventListener("change", function () { state.size = +size.value; state.page = 0; render(); });
  el("prev").addEventListener("click", function () { state.page--; render(); });
  el("next").addEventListener("click", function () { state.page++; render(); });
  images.forEach(function (im) { im.s = (im.f + "\\n" + im.c.join("\\n") + "\\n" + (im.l || "")).toLowerCase(); });
  // label x predicted class: counts, each cell filters the table to its images
  if (hasLabels) {
    var labels = {}, preds = {}, cell = {};
    images.forEach(function (im) {
      if (im.l === undefined) return;
      labels[im.l] = 1; preds[predicted(im)] = 1;
      var k = im.l + "\\u0000" + predicted(im); cell[k] = (cell[k] || 0) + 1;
    });
    var lk = Object.keys(labels).sort(), pk = Object.keys(preds).sort();
    var table = make("table", "grid confusion"), hr = make("tr");
    hr.appendChild(make("th", "", "label \\u2193 / top class \\u2192"));
    pk.forEach(function (p) { hr.appendChild(make("th", "", p)); });
    table.appendChild(hr);
    lk.forEach(function (l) {
      var tr = make("tr"); tr.appendChild(make("th", "", l));
      pk.forEach(function (p) {
        var td = make("td", l === p ? "agree" : ""), n = cell[l + "\\u0000" + p] || 0;
        if (n) {
          var b = make("button", "", String(n)); b.type = "button";
          b.title = "show the " + n + " image(s) labelled " + l + " whose top class is " + p;
          b.addEventListener("click", function () { state.label = l; state.cls = p; select.value = p; state.page = 0; render(); });
          td.appendChild(b);
        } else td.textContent = "0";
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    var box = el("confusion");
    box.appendChild(make("h2", "", "Label and top class"));
    box.appendChild(make("p", "muted", "Images per label (rows) and the model's top class (columns); click a count to list those images."));
    box.appendChild(table);
    box.hidden = false;
  }

  function value(im, key) {
    if (key === "file") return im.f;
    if (key === "class") return im.c[0];
    if (key === "label") return im.l === undefined ? null : im.l;
    var v = im.v[+key];
    return v && v.length ? v[0] : null;
  }
  function compare(a, b) {
    var x = value(a, state.sort), y = value(b, state.sort);
    if (x === null || y === null) return x === y ? 0 : (x === null ? 1 : -1);  // blanks last
    var r = typeof x === "string" ? (x < y ? -1 : x > y ? 1 : 0) : x - y;
    return r * state.dir || (a.f < b.f ? -1 : a.f > b.f ? 1 : 0);
  }
  function row(im) {
    var tr = make("tr", im === state.mark ? "marked" : "");
    var t = make("td", "thumb");
    if (im.u) {
      var a = make("a"); a.href = im.u; a.target = "_blank"; a.rel = "noopener";
      a.title = "open the full overlay";
      var img = make("img"); img.loading = "lazy"; img.decoding = "async"; img.alt = "overlay of " + im.f;
      img.addEventListener("error", function () { a.replaceChildren(make("span", "muted", "cannot show the overlay: open it")); });
      img.src = im.u;
      a.appendChild(img); t.appendChild(a);
    } else {
      t.appendChild(make("span", "muted", "no overlay"));
    }
    tr.appendChild(t);
    var f = make("td", "file");
    if (im.u) { var fa = make("a", "", im.f); fa.href = im.u; fa.target = "_blank"; fa.rel = "noopener"; f.appendChild(fa); }
    else f.textContent = im.f;
    tr.appendChild(f);
    if (hasLabels) {
      var lt = make("td", "lbl", im.l === undefined ? "" : im.l);
      if (im.l !== undefined) lt.appendChild(make("span", predicted(im) === im.l ? "ok" : "bad", predicted(im) === im.l ? " \\u2713" : " \\u2717 " + predicted(im)));
      tr.appendChild(lt);
    }
    var c = make("td", "cls");
    im.c.forEach(function (name, r) {
      var d = make("div"), rank = im.r && im.r[r] !== null && im.r[r] !== undefined ? im.r[r] : r + 1;
      var rk = make("span", "rk", String(rank)); rk.title = "rank " + rank + " among all outputs" + (im.t && im.t[r] ? "; explained as " + im.t[r] : "");
      d.appendChild(rk); d.appendChild(document.createTextNode(name));
      if (im.t && im.t[r] && im.t[r].indexOf("label") >= 0) d.appendChild(make("span", "tag", "label"));
      c.appendChild(d);
    });
    tr.appendChild(c);
    cols.forEach(function (col, i) {
      var td = make("td", "num");
      (im.v[i] || []).forEach(function (v) {
        var low = v !== null && ((col.key === "stability" && v < 0.5) || (col.warn_at != null && v >= col.warn_at));
        td.appendChild(make("div", low ? "low" : "", fmt(v, col.fmt)));
      });
      tr.appendChild(td);
    });
    return tr;
  }
  function visible() {
    var shown = images.filter(function (im) {
      return (!state.cls || predicted(im) === state.cls) && (!state.label || im.l === state.label) &&
        (!state.text || im.s.indexOf(state.text) >= 0);
    });
    return shown.sort(compare);
  }
  function render() {
    var shown = visible();
    var pages = Math.max(1, Math.ceil(shown.length / state.size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    var start = state.page * state.size, slice = shown.slice(start, start + state.size);
    var body = el("rows"), frag = document.createDocumentFragment();
    slice.forEach(function (im) { frag.appendChild(row(im)); });
    body.textContent = "";
    body.appendChild(frag);
    el("empty").hidden = shown.length > 0;
    el("empty").textContent = images.length ? "No image matches the filter." : "No image has been explained yet (topk.csv is empty).";
    Array.prototype.forEach.call(head.children, function (cell) {
      var on = cell.dataset.key === state.sort;
      cell.classList.toggle("sorted", on);
      cell.setAttribute("aria-sort", on ? (state.dir > 0 ? "ascending" : "descending") : "none");
      var b = cell.firstChild;
      if (b && b.firstChild) b.firstChild.textContent = b.firstChild.textContent.replace(/ [\\u25b2\\u25bc]$/, "") + (on ? (state.dir > 0 ? " \\u25b2" : " \\u25bc") : "");
    });
    var info = shown.length ? (start + 1).toLocaleString() + "\\u2013" + (start + slice.length).toLocaleString() + " of " + shown.length.toLocaleString() : "0";
    if (shown.length !== images.length) info += " (filtered from " + images.length.toLocaleString() + ")";
    el("info").textContent = info + " images";
    el("page").textContent = "page " + (state.page + 1) + " of " + pages;
    el("prev").disabled = state.page === 0;
    el("next").disabled = state.page >= pages - 1;
  }
  render();
  // #image=NAME (the Slides cards' top tiles): clear the filters, turn to that row's page and mark it;
  // #q=TEXT: filter the table by TEXT. A link to the hash already shown acts again on click.
  function follow() {
    var m = /^#(image|q)=(.*)$/.exec(location.hash), value;
    if (!m) return;
    try { value = decodeURIComponent(m[2]); } catch (e) { return; }
    state.cls = ""; state.label = ""; select.value = ""; state.mark = null;
    if (m[1] === "q") {
      text.value = value; state.text = value.trim().toLowerCase(); state.page = 0; render();
      el("browse").scrollIntoView();
      return;
    }
    var target = images.filter(function (im) { return im.f === value; })[0];
    if (!target) return;
    text.value = ""; state.text = ""; state.mark = target;
    state.page = Math.floor(visible().indexOf(target) / state.size);
    render();
    var tr = document.querySelector("#rows tr.marked");
    if (tr) tr.scrollIntoView({block: "center"});
  }
  window.addEventListener("hashchange", follow);
  document.addEventListener("click", function (e) {
    var a = e.target.closest ? e.target.closest("a[href^='#']") : null;
    if (a && a.hash === location.hash) follow();
  });
  follow();
  Array.prototype.forEach.call(document.querySelectorAll("#slides a.map img"), function (img) {
    function broken() { img.parentNode.replaceChildren(make("span", "muted", "cannot show the heatmap: open it")); }
    if (img.complete && img.naturalWidth === 0 && img.currentSrc) broken();
    else img.addEventListener("error", broken);
  });
  document.body.dataset.ready = "1";
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="explain-cli {version}">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1>explain-cli report</h1><span class="name">{name}</span><span class="badge {tone}">{badge}</span><span class="ver">explain-cli {version}</span></header>
<main>
{summary}
{slides}
{errors}
<section id="confusion" hidden></section>
<section id="browse">
<h2>Images</h2>
<div class="controls">
<input id="q" type="search" placeholder="Filter by file or class name" aria-label="filter by file or class name">
<select id="cls" aria-label="predicted class"><option value="">All predicted classes</option></select>
<select id="size" aria-label="rows per page"><option value="50">50 per page</option><option value="100" selected>100 per page</option><option value="250">250 per page</option><option value="500">500 per page</option></select>
<span class="info" id="info"></span>
</div>
<noscript><p class="empty">The image table needs JavaScript.</p></noscript>
<div class="tablewrap"><table id="images"><thead><tr id="head-row"></tr></thead><tbody id="rows"></tbody></table>
<div class="empty" id="empty" hidden>No image matches the filter.</div></div>
<div class="pager"><button id="prev" type="button">&larr; Previous</button><span id="page" class="muted"></span><button id="next" type="button">Next &rarr;</button></div>
</section>
</main>
<script id="report-data" type="application/json">{data}</script>
<script>{script}</script>
</body>
</html>
"""
