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
        # run.json is read through record.RunRecord: metrics and its random_reference are mappings or absent
        ref = ((info or {}).get("metrics") or {}).get("random_reference")
        if not ref:
            return {}
        return {k: v for k, v in ((k, _number(v)) for k, v in ref.items()) if v is not None}

    top = ref_of(outputs.run)
    if top:
        return top
    sums: dict[str, list[float]] = {}
    for _, info in outputs.shards:
        counts = info.get("counts") or {}
        weight = _number(counts.get("explained")) or 1.0
        for k, v in ref_of(info).items():
            acc = sums.setdefault(k, [0.0, 0.0])
            acc[0] += v * weight
            acc[1] += weight
    return {k: s / w for k, (s, w) in sums.items() if w}


def _runs(run: dict[str, Any]) -> list[dict[str, Any]]:
    return run.get("runs") or []  # RunRecord.runs: a list of run entries (mappings)


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
        counts = r.get("counts") or {}
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            r.get("started"), r.get("finished"), r.get("status"), r.get("exit_code"), counts.get("explained"),
            counts.get("already_done"), counts.get("failed"), counts.get("excluded"),
            _fmt_seconds(r.get("seconds")), r.get("host"), r.get("shard"))) + "</tr>")
    return f'<h3>Runs into this folder</h3><table class="grid runs">{head}{"".join(body)}</table>'


def _weights_note(run: dict[str, Any]) -> str:
    """Which weights ran (run.json ``weights``): 'pretrained weights', 'random weights', ..."""
    weights = run.get("weights") or {}
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
    counts = {(info.get("shard") or {}).get("count") for _, info in outputs.shards}
    total = max((c for c in counts if c is not None), default=len(outputs.shards))
    done = sum(1 for _, info in outputs.shards if info.get("status") == "complete")
    return f"sharded, not merged: {done} of {total} shards complete (then: explain-cli merge)", "warn"


def _sub(info: dict[str, Any], key: str) -> dict[str, Any]:
    """``info[key]`` when it is a dict (run.json is read defensively), else {}."""
    value = info.get(key)
    return value if isinstance(value, dict) else {}


def _summary_infos(outputs: RunOutputs) -> list[dict[str, Any]]:
    """The run records the counts and times add up: run.json's (unmerged), else the shards'."""
    infos = [outputs.run] if outputs.run and not outputs.run.get("merged") else [i for _, i in outputs.shards]
    if not infos and outputs.run:
        infos = [outputs.run]
    return infos


def _counts(infos: list[dict[str, Any]], key: str) -> list[int]:
    """``counts[key]`` of each record that has counts."""
    return [int(_number(i["counts"].get(key)) or 0) for i in infos if i.get("counts") is not None]


def _explained_card(images: list[dict[str, Any]], infos: list[dict[str, Any]]) -> str:
    already = sum(_counts(infos, "already_done"))
    # input.exclude applies to the whole folder: every shard counts the same files
    excluded = max(_counts(infos, "excluded"), default=0)
    notes = (f"{already:,} of them from an earlier run" if already else "",
             f"{excluded:,} skipped by input.exclude" if excluded else "")
    return _card("Images explained", f"{len(images):,}", "; ".join(n for n in notes if n))


def _failed_card(outputs: RunOutputs) -> str:
    failed = len({r.get("image") for r in outputs.errors if r.get("image")})
    return _card("Failed", f"{failed:,}", "see Failed images below" if failed else "", "bad" if failed else "")


def _rate_note(total_s: float | None, infos: list[dict[str, Any]]) -> str:
    """'2.10 images/s; started 2026-...' (or 's per image' below one image a second)."""
    explained_now = sum(_counts(infos, "explained"))
    rate = ""
    if total_s and explained_now:
        per_s = explained_now / total_s
        rate = f"{per_s:.2f} images/s" if per_s >= 1 else f"{total_s / explained_now:.1f} s per image"
    started = [str(i["started"]) for i in infos if i.get("started")]
    if started:
        rate += ("; " if rate else "") + "started " + min(started).replace("T", " ").replace("+00:00", " UTC")
    return rate


def _time_card(run: dict[str, Any], infos: list[dict[str, Any]]) -> str:
    seconds = [s for s in (_number(i.get("seconds")) for i in infos) if s is not None]
    total_s = sum(seconds) if seconds else _number(run.get("shard_seconds_total"))
    return _card("Time", _fmt_seconds(total_s), ("summed over shards; " if len(infos) > 1 else "")
                 + _runs_note(run) + _rate_note(total_s, infos))


def _device_card(infos: list[dict[str, Any]]) -> str:
    devices = sorted({str(i.get("device_name") or i.get("device")) for i in infos
                      if i.get("device_name") or i.get("device")})
    device_note = ", ".join(sorted({str(i.get("device")) for i in infos if i.get("device")}))
    return _card("Device", ", ".join(devices) or "-", device_note)


def _setup_cards(run: dict[str, Any]) -> list[str]:
    """The Explainer and Model cards, from the run's config."""
    config = _sub(run, "config")
    explainer = _sub(config, "explainer")
    model = _sub(config, "model")
    return [
        _card("Explainer", str(explainer.get("name", "-")),
              ", ".join(f"{k} {v}" for k, v in explainer.items() if k != "name" and not isinstance(v, dict))),
        _card("Model", str(model.get("arch", "-")), f"layer {model.get('layer', 'input')}; {_weights_note(run)}",
              "warn" if _weights_note(run) == "random weights" else ""),
    ]


def _top1(images: list[dict[str, Any]], i: int) -> list[float]:
    """Column ``i``'s value of each image's first explained class, where it has one."""
    return [img["v"][i][0] for img in images if img["v"][i] and img["v"][i][0] is not None]


def _samples_card(col: dict[str, Any], used: list[float]) -> str:
    """nsamples: auto: the median samples per image and how many images stopped at max_nsamples."""
    if not used:
        return ""
    hit = sum(1 for v in used if v >= col["warn_at"])
    return _card("Samples (auto)", f"{statistics.median(used):.0f}",
                 f"median per image; {hit} image(s) hit max_nsamples {col['warn_at']:.0f} before "
                 "target_stability" if hit else "median per image; every map reached target_stability",
                 "warn" if hit else "")


def _quality_card(col: dict[str, Any], values: list[float], ref: dict[str, float]) -> str:
    """The median stability, deletion or insertion AUC of the top-1 maps (the AUCs beside their random reference)."""
    if not values:
        return ""
    key = col["key"]
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
    return _card(f"{col['label']}", f"{median:.3f}" if key != "stability" else f"{median:.2f}", note, tone)


def _metric_cards(images: list[dict[str, Any]], columns: list[dict[str, Any]], ref: dict[str, float]) -> list[str]:
    """One card per summarised column: samples (nsamples auto), stability, deletion and insertion AUC."""
    cards = []
    for col in columns:
        key = col["key"]
        if key == "nsamples_used" and col.get("warn_at") is not None:
            cards.append(_samples_card(col, _top1(images, columns.index(col))))
        elif key in ("stability", "deletion_auc", "insertion_auc"):
            cards.append(_quality_card(col, _top1(images, columns.index(col)), ref))
    return [c for c in cards if c]


def _training_card(run: dict[str, Any]) -> str:
    """An amortized explainer's own check against Kernel SHAP (run.json explainer_training), '' without one."""
    trained = _sub(run, "explainer_training")
    r = trained.get("kernel_median_pearson")
    if not isinstance(r, (int, float)) or isinstance(r, bool):
        return ""
    return _card("Explainer vs Kernel SHAP", f"{r:.2f}",
                 f"median Pearson r of the trained explainer's maps and Kernel SHAP's on "
                 f"{trained.get('kernel_images')} held-out image(s), {trained.get('kernel_nsamples')} "
                 f"samples each (explain-cli train); below 0.5 the maps are a rough guide at best",
                 "warn" if r < 0.5 else "")


def _read_from(outputs: RunOutputs) -> str:
    """'run.json, run.shard-1-of-2.json; topk.csv': the files the page was built from."""
    return (", ".join(["run.json"] if outputs.run else []) + (", " if outputs.run and outputs.shards else "")
            + ", ".join(n for n, _ in outputs.shards) + "; " + ", ".join(outputs.topk_files))


def _about_rows(outputs: RunOutputs, run: dict[str, Any], ref: dict[str, float]) -> list[tuple[str, Any]]:
    """The Run table of the details: status, times, counts, host, command, ... (the unset ones left out)."""
    command = run.get("command")
    about = [(k, v) for k, v in (
        ("status", run.get("status")), ("started", run.get("started")), ("finished", run.get("finished")),
        ("seconds", run.get("seconds") if run.get("seconds") is not None else run.get("shard_seconds_total")),
        ("counts", json.dumps(run.get("counts")) if run.get("counts") is not None else None),
        ("images found", run.get("images_found")), ("limit", run.get("limit")),
        ("host", run.get("host")), ("torch threads", run.get("torch_threads")),
        ("peak GPU memory (MB)", run.get("peak_gpu_memory_mb")),
        ("config file", run.get("config_file")),
        ("command", " ".join(map(str, command)) if isinstance(command, list) else command),
        ("read from", _read_from(outputs)),
    ) if v is not None and v != ""]
    if ref:
        about.append(("random-order reference", ", ".join(f"{k} {v:.4g}" for k, v in ref.items())))
    return about


def _shards_table(outputs: RunOutputs) -> str:
    """One row per shard's run.shard-*.json ('' for an unsharded run)."""
    if not outputs.shards:
        return ""
    head = "<tr><th>file</th><th>status</th><th>host</th><th>device</th><th>explained</th><th>failed</th><th>time</th><th>finished</th></tr>"
    body = []
    for name, info in outputs.shards:
        counts = _sub(info, "counts")
        body.append("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in (
            name, info.get("status"), info.get("host"), info.get("device_name") or info.get("device"),
            counts.get("explained"), counts.get("failed"), _fmt_seconds(info.get("seconds")),
            info.get("finished"))) + "</tr>")
    return f'<h3>Shards</h3><table class="grid">{head}{"".join(body)}</table>'


def _details_html(outputs: RunOutputs, run: dict[str, Any], ref: dict[str, float]) -> str:
    """The folded 'Run details, settings and versions' block."""
    settings: list[tuple[str, str]] = []
    _flatten("", _sub(run, "config"), settings)
    versions = _sub(run, "versions")
    shard_rows = _shards_table(outputs) + _runs_table(run)
    return (
        '<details class="more"><summary>Run details, settings and versions</summary><div class="cols">'
        f'<div><h3>Run</h3>{_kv_table(_about_rows(outputs, run, ref))}{shard_rows}</div>'
        f'<div><h3>Settings</h3>{_kv_table(settings)}</div>'
        f'<div><h3>Versions</h3>{_kv_table(list(versions.items()))}</div>'
        '</div></details>'
    )


def _summary_html(outputs: RunOutputs, images: list[dict[str, Any]], columns: list[dict[str, Any]]) -> str:
    """The cards (counts, time, device, explainer, model, the maps' quality) and the folded run details."""
    run = outputs.run or (outputs.shards[0][1] if outputs.shards else {})
    infos = _summary_infos(outputs)
    ref = _random_reference(outputs)
    cards = [_explained_card(images, infos), _failed_card(outputs), _time_card(run, infos), _device_card(infos),
             *_setup_cards(run), *_metric_cards(images, columns, ref), _training_card(run)]
    return f'<section class="cards">{"".join(cards)}</section>{_details_html(outputs, run, ref)}'


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
