"""``explain-cli merge OUTPUT_DIR``: combine the shard files of a sharded run into one result.

A sharded run (``--shard I/N`` or a Slurm array) leaves, per shard, ``topk.shard-I-of-N.csv``,
``errors.shard-I-of-N.csv`` and ``run.shard-I-of-N.json`` in the shared output folder. ``merge``
checks that the shards form one complete run and writes ``topk.csv`` and ``errors.csv`` (sorted
by image, then rank) and a ``run.json`` summary. It refuses (UserError, exit 2), naming the
files, when:

* a shard of 0..N-1 has no files, or its run.json says it was interrupted, is still running,
  was killed, or ran with ``--limit``;
* shard files of different N are mixed (``shard-0-of-4`` next to ``shard-0-of-2``);
* the shards ran with different configs (``device``, ``batch_size`` and ``output.dir`` may
  differ: results do not depend on them), or saw a different number of input images;
* an image is listed by two shards, or a shard lists other images than its run.json counted;
* ``topk.csv`` there is an unsharded run's, not an earlier merge's.

Merging is idempotent: the outputs depend only on the shard files (no timestamps of their
own), are written atomically, and a second merge rewrites the same bytes; shard files are
left in place. This module does not import torch.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explain_cli import __version__
from explain_cli.errors import UserError
from explain_cli.job import lock_held, output_lock
from explain_cli.record import Counts, RunRecord, RunRecordError, ShardSummary
from explain_cli.write import (ERROR_COLUMNS, TOPK_COLUMNS, quote_cell, atomic_write_text, parse_csv,
                               read_csv_text)

log = logging.getLogger("explain_cli")

SHARD_FILE = re.compile(r"^(topk|errors|run)\.shard-(\d+)-of-(\d+)\.(csv|json)$")
KINDS = {"topk": "csv", "errors": "csv", "run": "json"}

# Resolved-config keys that may differ between the shards of one run: where a shard ran and
# how it batched or how many processes wrote its overlays do not change its numbers (results
# are seeded per image).
PER_SHARD_KEYS = {("device",), ("batch_size",), ("workers",), ("output", "dir")}
# Config paths, compared after resolving against the folder of each shard's config file.
PATH_KEYS = [("input", "dir"), ("labels",), ("model", "checkpoint"), ("background", "dir")]


@dataclass
class MergeSummary:
    output_dir: Path
    shards: int = 0
    images: int = 0
    explained: int = 0
    failed: int = 0
    topk_rows: int = 0
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)


def shard_name(kind: str, index: int, count: int) -> str:
    return f"{kind}.shard-{index}-of-{count}.{KINDS[kind]}"


def _refuse(output_dir: Path, problems: list[str]) -> UserError:
    head = f"cannot merge {output_dir}:"
    return UserError("\n  ".join([head] + problems))


def _scan(output_dir: Path) -> dict[int, dict[tuple[str, int], Path]]:
    """Shard files by N, then by (kind, index)."""
    found: dict[int, dict[tuple[str, int], Path]] = {}
    for path in sorted(output_dir.iterdir()):
        m = SHARD_FILE.match(path.name)
        if not m or KINDS[m.group(1)] != m.group(4) or not path.is_file():
            continue
        kind, index, count = m.group(1), int(m.group(2)), int(m.group(3))
        found.setdefault(count, {})[(kind, index)] = path
    return found


def _read_csv(path: Path, columns: list[str]) -> list[list[str]]:
    """Rows (without the header) of a shard CSV; a torn last record (a killed run) is dropped.
    Cells stay escaped as written (names.escape): merge copies them unchanged."""
    try:
        rows = parse_csv(read_csv_text(path))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not an explain-cli CSV (not UTF-8 text); rerun that shard with --overwrite") from None
    if not rows or len(rows[0]) < 2 or rows[0] != columns[:len(rows[0])]:
        got = ",".join(rows[0]) if rows else "(empty file)"
        raise UserError(f"{path}: not an explain-cli CSV (header {got!r}, expected {','.join(columns)!r})")
    # a shard written by an earlier version has fewer trailing columns: blank cells, as CsvLog pads
    pad = [""] * (len(columns) - len(rows[0]))
    return [r + pad for r in rows[1:] if r]


def _flatten(data: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if isinstance(data, dict):
        out: dict[tuple, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, prefix + (k,)))
        return out
    return {prefix: data}


def _comparable_config(info: RunRecord) -> dict[tuple, Any]:
    """The run.json config, flattened, without per-shard keys, with paths made absolute."""
    flat = _flatten(info.config or {})
    config_file = info.config_file
    base = Path(config_file).parent if config_file else None
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and base is not None:
            p = Path(os.path.expanduser(value))
            flat[key] = os.path.normpath(str(p if p.is_absolute() else base / p))
    return {k: v for k, v in flat.items() if k not in PER_SHARD_KEYS}


def _load_run_json(path: Path) -> RunRecord:
    """A shard's (or an earlier merge's) run.json; UserError naming the file when it is unusable."""
    try:
        return RunRecord.read(path)
    except RunRecordError as exc:
        if exc.problem.startswith("cannot read"):
            raise UserError(f"{path}: {exc.problem}") from None
        raise UserError(f"{exc}; rerun that shard with --overwrite") from None


def _render_csv(columns: list[str], rows: list[list[str]]) -> str:
    """Rows as read (already escaped), quoted like CsvLog's."""
    return "".join(",".join(quote_cell(c) for c in row) + "\n" for row in [columns] + rows)


def _write_if_changed(path: Path, text: str, summary: MergeSummary) -> None:
    try:
        same = read_csv_text(path) == text
    except (FileNotFoundError, UnicodeDecodeError):
        same = False
    if same:
        summary.unchanged.append(path.name)
    else:
        atomic_write_text(path, text)
        summary.written.append(path.name)


def _check_shards(output_dir: Path, found: dict[int, dict[tuple[str, int], Path]]) -> tuple[int, dict[int, RunRecord]]:
    """The N of the run and each shard's run.json; UserError naming every problem otherwise:
    the shard files (:func:`_one_run`), each shard's state (:func:`_shard_problems`), then that
    they ran one config on one input folder (:func:`_agreement_problems`)."""
    count, files = _one_run(output_dir, found)
    problems: list[str] = []
    stray = sorted(p.name for (kind, i), p in files.items() if i >= count)
    if stray:
        problems.append(f"shard index out of range for N={count}: {', '.join(stray)}")
    infos: dict[int, RunRecord] = {}
    for i in range(count):
        problems += _shard_problems(output_dir, files, i, count, infos)
    if problems:
        raise _refuse(output_dir, problems)
    problems = _agreement_problems(infos, count)
    if problems:
        raise _refuse(output_dir, problems)
    return count, infos


def _one_run(output_dir: Path, found: dict[int, dict[tuple[str, int], Path]]) -> tuple[int, dict[tuple[str, int], Path]]:
    """N and the shard files, when the folder holds shard files of one N; UserError otherwise."""
    if not found:
        if (output_dir / "topk.csv").exists():
            raise _refuse(output_dir, ["no shard files (topk.shard-I-of-N.csv) here: topk.csv is already "
                                       "a whole run's result (an unsharded run, or an earlier merge whose "
                                       "shard files were removed); nothing to merge"])
        raise _refuse(output_dir, ["no shard files (topk.shard-I-of-N.csv, errors.shard-I-of-N.csv, "
                                   "run.shard-I-of-N.json) here; run `explain-cli run CONFIG --shard I/N` first"])
    if len(found) > 1:
        problems = ["shard files of different runs are mixed (different N); move the stale ones away:"]
        for count in sorted(found):
            names = sorted(p.name for p in found[count].values())
            problems.append(f"N={count}: {', '.join(names)}")
        raise _refuse(output_dir, problems)
    (count, files), = found.items()
    return count, files


def _shard_problems(output_dir: Path, files: dict[tuple[str, int], Path], i: int, count: int,
                    infos: dict[int, RunRecord]) -> list[str]:
    """Why shard ``i`` cannot be merged (missing files, still running, interrupted, killed, renamed,
    --limit); its run.json goes into ``infos``."""
    missing = [shard_name(k, i, count) for k in KINDS if (k, i) not in files]
    if len(missing) == len(KINDS):
        return [f"shard {i} of {count} is missing: no {', '.join(missing)} "
                f"(run it: explain-cli run CONFIG --shard {i}/{count})"]
    if ("run", i) not in files:
        return [f"shard {i} of {count}: {missing[0] if len(missing) == 1 else ', '.join(missing)} "
                f"missing (rerun the shard: explain-cli run CONFIG --shard {i}/{count})"]
    run_path = files[("run", i)]
    info = infos[i] = _load_run_json(run_path)
    problems = []
    status = info.status
    rerun = f"rerun it to finish: explain-cli run CONFIG --shard {i}/{count}"
    if lock_held(output_dir / f".explain-cli.shard-{i}-of-{count}.lock"):
        problems.append(f"shard {i} of {count} is still running ({run_path.name}: status "
                        f"{status!r}); merge when it has finished")
    elif status == "interrupted":
        by = info.interrupted_by or "a signal"
        problems.append(f"shard {i} of {count} was interrupted by {by} ({run_path.name}); {rerun}")
    elif status != "complete":
        problems.append(f"shard {i} of {count} did not finish ({run_path.name}: status {status!r}, "
                        f"the job was killed); {rerun}")
    elif missing:
        problems.append(f"shard {i} of {count}: {', '.join(missing)} missing; {rerun}")
    shard = (info.shard.index, info.shard.count) if info.shard is not None else (None, None)
    if status == "complete" and shard != (i, count):
        problems.append(f"{run_path.name} describes shard {shard[0]}/{shard[1]}, not {i}/{count} (renamed file?)")
    if info.limit is not None:
        problems.append(f"shard {i} of {count} ran with --limit {info.limit} ({run_path.name}): "
                        f"not every image of the shard was explained; rerun it without --limit")
    return problems


def _agreement_problems(infos: dict[int, RunRecord], count: int) -> list[str]:
    """One config for all shards (up to per-shard keys), and the same input folder listing."""
    problems = []
    ref_i = 0
    ref = _comparable_config(infos[ref_i])
    ref_name = shard_name("run", ref_i, count)
    for i in range(1, count):
        other = _comparable_config(infos[i])
        diffs = []
        for key in sorted(set(ref) | set(other), key=lambda k: tuple(map(str, k))):
            a, b = ref.get(key, "(unset)"), other.get(key, "(unset)")
            if a != b:
                diffs.append(f"{'.'.join(map(str, key))}: {a!r} vs {b!r}")
        if diffs:
            shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
            problems.append(f"{shard_name('run', i, count)} and {ref_name} have different configs ({shown})")
    found_counts = {i: info.images_found for i, info in infos.items()}
    if len({v for v in found_counts.values() if v is not None}) > 1:
        listing = ", ".join(f"{shard_name('run', i, count)}: {v}" for i, v in sorted(found_counts.items()))
        problems.append(f"the shards saw different numbers of input images ({listing}): the input folder "
                        f"changed between shard runs; rerun every shard with --overwrite")
    return problems


@dataclass
class _Rows:
    """The shards' rows as merge gathers them: topk and errors rows, which shard lists each image."""

    topk: list[list[str]] = field(default_factory=list)
    errors: list[list[str]] = field(default_factory=list)
    owner: dict[str, tuple[int, str]] = field(default_factory=dict)  # image -> (shard, file) that first lists it
    reported: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    per_shard: list[ShardSummary] = field(default_factory=list)


def merge(output_dir: Path) -> MergeSummary:
    """Check the shard files of ``output_dir`` and write topk.csv, errors.csv and run.json: check
    the shards, gather their rows, check the rows, write the merged files."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"merge: not a folder: {output_dir}")
    if not _scan(output_dir):  # refused before the lock file is made: a wrong folder keeps no trace
        _check_shards(output_dir, {})
    from explain_cli.config import check_output_dir

    check_output_dir(output_dir, key="merge")  # a read-only folder: exit 2 naming it, not an OSError
    with output_lock(output_dir, "", merging=True):
        found = _scan(output_dir)
        count, infos = _check_shards(output_dir, found)
        run_json = output_dir / "run.json"
        _check_earlier_result(output_dir, run_json)
        rows = _Rows()
        for i in range(count):
            _gather_shard(rows, found[count], i, count, infos[i])
        _check_rows(output_dir, rows, infos)
        rows.topk.sort(key=lambda r: r[0])  # stable: an image's rows keep the asked order (targets.classes)
        rows.errors.sort(key=lambda r: r[0])
        summary = MergeSummary(output_dir=output_dir, shards=count, images=len(rows.owner),
                               explained=len({r[0] for r in rows.topk}), failed=len({r[0] for r in rows.errors}),
                               topk_rows=len(rows.topk))
        _write_if_changed(output_dir / "topk.csv", _render_csv(TOPK_COLUMNS, rows.topk), summary)
        _write_if_changed(output_dir / "errors.csv", _render_csv(ERROR_COLUMNS, rows.errors), summary)
        _write_if_changed(run_json, _merged_record(summary, infos, rows).text() + "\n", summary)
        _stitch_slides(output_dir, infos[0].config)
    return summary


def _check_earlier_result(output_dir: Path, run_json: Path) -> None:
    """UserError when topk.csv or run.json here are an unsharded run's (a merge would overwrite them)."""
    if run_json.exists():
        if not _load_run_json(run_json).merged:
            raise _refuse(output_dir, [
                "topk.csv, errors.csv and run.json here are from an unsharded run (run.json has no "
                "'merged' entry); merging would overwrite them: move them away first"])
    elif (output_dir / "topk.csv").exists():
        raise _refuse(output_dir, ["topk.csv here is not from an earlier merge (no run.json with "
                                   "'merged'); merging would overwrite it: move it away first"])


def _gather_shard(rows: _Rows, files: dict[tuple[str, int], Path], i: int, count: int, info: RunRecord) -> None:
    """Shard ``i``'s topk and errors rows into ``rows``, with the problems they show (a short row, an
    image listed twice, or by two shards, or a count that is not its run.json's)."""
    shard_images: set[str] = set()
    for kind, columns, sink in (("topk", TOPK_COLUMNS, rows.topk), ("errors", ERROR_COLUMNS, rows.errors)):
        path = files[(kind, i)]
        seen_keys: set[tuple[str, str]] = set()
        for row in _read_csv(path, columns):
            if len(row) != len(columns):
                rows.problems.append(f"{path.name}: a row has {len(row)} fields, expected {len(columns)}: {row!r}")
                continue
            image = row[0]
            key = (image, row[1] if kind == "topk" else "")
            if key in seen_keys:
                rows.problems.append(f"{path.name} lists {image}" + (f" rank {row[1]}" if kind == "topk" else "")
                                     + " twice")
                continue
            seen_keys.add(key)
            prev = rows.owner.get(image)
            if prev is not None and prev != (i, path.name) and image not in rows.reported:
                rows.reported.add(image)
                where = "two shards" if prev[0] != i else "one shard's topk and errors"
                rows.problems.append(f"{image} is in {where}: {prev[1]} and {path.name}")
            rows.owner.setdefault(image, (i, path.name))
            shard_images.add(image)
            sink.append(row)
    counts = info.counts or Counts()
    if counts.selected is not None and counts.selected != len(shard_images):
        rows.problems.append(f"shard {i} of {count}: {shard_name('run', i, count)} counts {counts.selected} images, "
                             f"but {shard_name('topk', i, count)} and {shard_name('errors', i, count)} "
                             f"list {len(shard_images)}; rerun the shard (with --overwrite if images were "
                             f"removed from the input folder)")
    rows.per_shard.append(ShardSummary(
        index=i, run_json=shard_name("run", i, count), images=len(shard_images), host=info.host,
        device=info.device, device_name=info.device_name, started=info.started, finished=info.finished,
        seconds=info.seconds, counts=counts))


def _check_rows(output_dir: Path, rows: _Rows, infos: dict[int, RunRecord]) -> None:
    """UserError with the rows' problems, or when the shards list another number of images than
    the input folder had."""
    if rows.problems:
        shown = rows.problems[:20] + ([f"... and {len(rows.problems) - 20} more"] if len(rows.problems) > 20 else [])
        raise _refuse(output_dir, shown)
    found_total = {info.images_found for info in infos.values()} - {None}
    if found_total and len(rows.owner) != next(iter(found_total)):
        raise _refuse(output_dir, [f"the shards list {len(rows.owner)} images but the input folder had "
                                   f"{next(iter(found_total))}; some shard files do not belong to this run"])


def _merged_record(summary: MergeSummary, infos: dict[int, RunRecord], rows: _Rows) -> RunRecord:
    """The merged run.json: the first shard's config, the counts of the merged rows, every shard's
    times and run records. Nothing of its own changes between merges (idempotent)."""
    first = infos[0]
    seconds = [s.seconds for s in rows.per_shard if s.seconds is not None]
    started = [s.started for s in rows.per_shard if s.started]
    finished = [s.finished for s in rows.per_shard if s.finished]
    return RunRecord(
        explain_cli=__version__, status="complete", merged=True, shards=summary.shards,
        config_file=first.config_file, config=first.config, weights=first.weights,
        counts=Counts(images=summary.images, explained=summary.explained, failed=summary.failed,
                      topk_rows=summary.topk_rows),
        started=min(started) if started else None, finished=max(finished) if finished else None,
        shard_seconds_total=round(sum(seconds), 3) if seconds else None,
        versions=first.versions, metrics=_merged_metrics(infos, rows.topk), overlay_scale=_merged_scale(infos),
        per_shard=rows.per_shard,
        # every shard's run records (reruns included), oldest first
        runs=sorted((r for info in infos.values() for r in (info.runs or [])), key=lambda r: str(r.started)))


def _stitch_slides(output_dir: Path, config: dict[str, Any] | None) -> None:
    """A slide run's heatmaps, from the merged topk.csv: a slide whose tiles ran in several shards
    gets one heatmap (no shard could draw it alone). ``config``: run.json's (RunRecord.config), whose
    sections are read defensively (a hand-edited one may lack them)."""
    slides = (config or {}).get("slides")
    if not isinstance(slides, dict) or not (output_dir / "slides").is_dir():
        return
    from explain_cli.slides.heatmap import write_heatmaps

    heatmap = slides.get("heatmap") if isinstance(slides.get("heatmap"), dict) else {}
    explainer = config.get("explainer") if isinstance(config.get("explainer"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    try:
        write_heatmaps(output_dir, output_dir / "topk.csv", output_dir / "errors.csv", str(explainer.get("name", "?")),
                       str(model.get("layer", "?")), bool(heatmap.get("tiff", False)))
    except Exception as exc:  # noqa: BLE001 - the merged CSVs are written; a rerun of merge redraws
        log.warning("could not draw the slide heatmaps (%s: %s); the merged topk.csv holds every tile, "
                    "rerun `explain-cli merge` to draw them", type(exc).__name__, exc)


def _merged_scale(infos: dict[int, RunRecord]) -> dict[str, Any] | None:
    """The shards' ``overlay_scale`` (explain_cli/overlay_scale.py): one entry when they agree
    (the same calibration gives the same limit; 0.1 % allows another device's rounding), else
    each shard's, with a warning: their overlays are then drawn on different scales."""
    import logging

    entries = [info.overlay_scale for _, info in sorted(infos.items())]
    known = [e for e in entries if e is not None]
    if not known:
        return None
    limits = [e.get("limit") for e in known]
    same_mode = len({e.get("mode") for e in known}) == 1
    numbers = [v for v in limits if isinstance(v, (int, float))]
    agree = same_mode and len(known) == len(entries) and (
        len(numbers) == 0 and all(v is None for v in limits)
        or len(numbers) == len(limits) and max(numbers) <= min(numbers) * 1.001)
    if agree:
        return known[0]
    shown = ", ".join(f"shard {i}: " + (f"{e.get('mode')} {e.get('limit')}" if e is not None else "none")
                      for i, e in enumerate(entries))
    logging.getLogger("explain_cli").warning(
        "merge: the shards drew their overlays on different colour scales (output.scale; %s); rerun the "
        "shards that differ with --overwrite to put them on one", shown)
    return {"mode": "differs", "per_shard": entries}


def _merged_metrics(infos: dict[int, RunRecord], topk: list[list[str]]) -> dict[str, Any] | None:
    """The shards' run.json ``metrics`` combined; the stability median from the merged rows."""
    from explain_cli.metrics import merge_summaries

    column = TOPK_COLUMNS.index("stability")
    stabilities = []
    for row in topk:
        try:
            stabilities.append(float(row[column]))
        except ValueError:
            pass
    return merge_summaries([None if infos[i].metrics is None else infos[i].metrics.dump() for i in sorted(infos)],
                           stabilities)


def _rank(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
