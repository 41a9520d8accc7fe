"""The page's summary (server-side HTML, every value escaped): the cards, run details, settings and
versions, the failed images."""

from __future__ import annotations

import html
import json
import re
import statistics
from typing import Any

from explain_cli.report.outputs import RunOutputs, _number


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
