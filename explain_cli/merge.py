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

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from explain_cli import __version__
from explain_cli.errors import UserError
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


def _lock_held(path: Path) -> bool:
    """Whether a run holds this shard's lock file (never creates the file)."""
    import fcntl

    try:
        fh = open(path, "r")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


@contextlib.contextmanager
def _merge_lock(output_dir: Path) -> Iterator[None]:
    """The unsharded run's lock: a merge and an unsharded run never write topk.csv together."""
    import fcntl

    path = output_dir / ".explain-cli.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another explain-cli run or merge is writing to {output_dir} "
                            f"(lock {path.name} is held); wait for it") from None
        yield


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


def _comparable_config(info: dict[str, Any]) -> dict[tuple, Any]:
    """The run.json config, flattened, without per-shard keys, with paths made absolute."""
    flat = _flatten(info.get("config") or {})
    config_file = info.get("config_file")
    base = Path(config_file).parent if config_file else None
    for key in PATH_KEYS:
        value = flat.get(key)
        if isinstance(value, str) and base is not None:
            p = Path(os.path.expanduser(value))
            flat[key] = os.path.normpath(str(p if p.is_absolute() else base / p))
    return {k: v for k, v in flat.items() if k not in PER_SHARD_KEYS}


def _load_run_json(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: not an explain-cli run.json")
    problem = _run_json_problem(info)
    if problem:
        raise UserError(f"{path}: not an explain-cli run.json ({problem}); rerun that shard with --overwrite")
    return info


#: The entries of a run.json that merge reads, and their types (None is allowed for each).
_RUN_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "status": (str,), "shard": (dict,), "config": (dict,), "config_file": (str,), "images_found": (int,),
    "counts": (dict,), "runs": (list,), "metrics": (dict,), "started": (str,), "finished": (str,),
    "seconds": (int, float), "limit": (int,), "merged": (bool,)}
#: Entries of run.json's ``metrics`` that merge adds up, and their types.
_METRICS_TYPES: dict[str, tuple[type, ...]] = {"rows": (int,), "model_evaluations": (int,), "mean": (dict,),
                                               "random_reference": (dict,)}


def _run_json_problem(info: dict[str, Any]) -> str | None:
    """Why a run.json read back (perhaps edited or damaged) cannot be merged; None when it can."""
    for entries, types, prefix in ((info, _RUN_JSON_TYPES, ""),
                                   (info.get("metrics") or {}, _METRICS_TYPES, "metrics.")):
        for key, kinds in types.items():
            value = entries.get(key)
            wrong_bool = isinstance(value, bool) and bool not in kinds
            if value is not None and (wrong_bool or not isinstance(value, kinds)):
                return f"{prefix}{key} is {type(value).__name__}, expected {' or '.join(k.__name__ for k in kinds)}"
    return None


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


def _check_shards(output_dir: Path, found: dict[int, dict[tuple[str, int], Path]]) -> tuple[int, dict[int, dict]]:
    """The N of the run and each shard's run.json; UserError naming every problem otherwise."""
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
    problems: list[str] = []
    stray = sorted(p.name for (kind, i), p in files.items() if i >= count)
    if stray:
        problems.append(f"shard index out of range for N={count}: {', '.join(stray)}")
    infos: dict[int, dict] = {}
    for i in range(count):
        missing = [shard_name(k, i, count) for k in KINDS if (k, i) not in files]
        if len(missing) == len(KINDS):
            problems.append(f"shard {i} of {count} is missing: no {', '.join(missing)} "
                            f"(run it: explain-cli run CONFIG --shard {i}/{count})")
            continue
        if ("run", i) not in files:
            problems.append(f"shard {i} of {count}: {missing[0] if len(missing) == 1 else ', '.join(missing)} "
                            f"missing (rerun the shard: explain-cli run CONFIG --shard {i}/{count})")
            continue
        run_path = files[("run", i)]
        info = _load_run_json(run_path)
        infos[i] = info
        status = info.get("status")
        rerun = f"rerun it to finish: explain-cli run CONFIG --shard {i}/{count}"
        if _lock_held(output_dir / f".explain-cli.shard-{i}-of-{count}.lock"):
            problems.append(f"shard {i} of {count} is still running ({run_path.name}: status "
                            f"{status!r}); merge when it has finished")
        elif status == "interrupted":
            by = info.get("interrupted_by") or "a signal"
            problems.append(f"shard {i} of {count} was interrupted by {by} ({run_path.name}); {rerun}")
        elif status != "complete":
            problems.append(f"shard {i} of {count} did not finish ({run_path.name}: status {status!r}, "
                            f"the job was killed); {rerun}")
        elif missing:
            problems.append(f"shard {i} of {count}: {', '.join(missing)} missing; {rerun}")
        shard = info.get("shard") or {}
        if status == "complete" and (shard.get("index"), shard.get("count")) != (i, count):
            problems.append(f"{run_path.name} describes shard {shard.get('index')}/{shard.get('count')}, "
                            f"not {i}/{count} (renamed file?)")
        if info.get("limit") is not None:
            problems.append(f"shard {i} of {count} ran with --limit {info['limit']} ({run_path.name}): "
                            f"not every image of the shard was explained; rerun it without --limit")
    if problems:
        raise _refuse(output_dir, problems)

    # One config for all shards (up to per-shard keys), and the same input folder listing.
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
    found_counts = {i: info.get("images_found") for i, info in infos.items()}
    if len({v for v in found_counts.values() if v is not None}) > 1:
        listing = ", ".join(f"{shard_name('run', i, count)}: {v}" for i, v in sorted(found_counts.items()))
        problems.append(f"the shards saw different numbers of input images ({listing}): the input folder "
                        f"changed between shard runs; rerun every shard with --overwrite")
    if problems:
        raise _refuse(output_dir, problems)
    return count, infos


def merge(output_dir: Path) -> MergeSummary:
    """Check the shard files of ``output_dir`` and write topk.csv, errors.csv and run.json."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"merge: not a folder: {output_dir}")
    if not _scan(output_dir):  # refused before the lock file is made: a wrong folder keeps no trace
        _check_shards(output_dir, {})
    from explain_cli.config import check_output_dir

    check_output_dir(output_dir, key="merge")  # a read-only folder: exit 2 naming it, not an OSError
    with _merge_lock(output_dir):
        found = _scan(output_dir)
        count, infos = _check_shards(output_dir, found)
        files = found[count]

        run_json = output_dir / "run.json"
        if run_json.exists():
            existing = _load_run_json(run_json)
            if not existing.get("merged"):
                raise _refuse(output_dir, [
                    "topk.csv, errors.csv and run.json here are from an unsharded run (run.json has no "
                    "'merged' entry); merging would overwrite them: move them away first"])
        elif (output_dir / "topk.csv").exists():
            raise _refuse(output_dir, ["topk.csv here is not from an earlier merge (no run.json with "
                                       "'merged'); merging would overwrite it: move it away first"])

        topk: list[list[str]] = []
        errors: list[list[str]] = []
        owner: dict[str, tuple[int, str]] = {}  # image -> (shard, file) that first lists it
        reported: set[str] = set()
        problems: list[str] = []
        per_shard = []
        for i in range(count):
            shard_images: set[str] = set()
            for kind, columns, sink in (("topk", TOPK_COLUMNS, topk), ("errors", ERROR_COLUMNS, errors)):
                path = files[(kind, i)]
                rows = _read_csv(path, columns)
                seen_keys: set[tuple[str, str]] = set()
                for row in rows:
                    if len(row) != len(columns):
                        problems.append(f"{path.name}: a row has {len(row)} fields, expected {len(columns)}: {row!r}")
                        continue
                    image = row[0]
                    key = (image, row[1] if kind == "topk" else "")
                    if key in seen_keys:
                        problems.append(f"{path.name} lists {image}" + (f" rank {row[1]}" if kind == "topk" else "")
                                        + " twice")
                        continue
                    seen_keys.add(key)
                    prev = owner.get(image)
                    if prev is not None and prev != (i, path.name) and image not in reported:
                        reported.add(image)
                        where = "two shards" if prev[0] != i else "one shard's topk and errors"
                        problems.append(f"{image} is in {where}: {prev[1]} and {path.name}")
                    owner.setdefault(image, (i, path.name))
                    shard_images.add(image)
                    sink.append(row)
            counts = infos[i].get("counts") or {}
            selected = counts.get("selected")
            if isinstance(selected, int) and selected != len(shard_images):
                problems.append(f"shard {i} of {count}: {shard_name('run', i, count)} counts {selected} images, "
                                f"but {shard_name('topk', i, count)} and {shard_name('errors', i, count)} "
                                f"list {len(shard_images)}; rerun the shard (with --overwrite if images were "
                                f"removed from the input folder)")
            per_shard.append({
                "index": i, "run_json": shard_name("run", i, count), "images": len(shard_images),
                "host": infos[i].get("host"), "device": infos[i].get("device"),
                "device_name": infos[i].get("device_name"), "started": infos[i].get("started"),
                "finished": infos[i].get("finished"), "seconds": infos[i].get("seconds"),
                "counts": counts,
            })
        if problems:
            shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
            raise _refuse(output_dir, shown)
        found_total = {info.get("images_found") for info in infos.values()} - {None}
        if found_total and len(owner) != next(iter(found_total)):
            raise _refuse(output_dir, [f"the shards list {len(owner)} images but the input folder had "
                                       f"{next(iter(found_total))}; some shard files do not belong to this run"])

        topk.sort(key=lambda r: r[0])  # stable: an image's rows keep the asked order (targets.classes)
        errors.sort(key=lambda r: r[0])
        summary = MergeSummary(output_dir=output_dir, shards=count, images=len(owner),
                               explained=len({r[0] for r in topk}), failed=len({r[0] for r in errors}),
                               topk_rows=len(topk))
        first = infos[0]
        seconds = [s["seconds"] for s in per_shard if isinstance(s.get("seconds"), (int, float))]
        started = [s["started"] for s in per_shard if s.get("started")]
        finished = [s["finished"] for s in per_shard if s.get("finished")]
        merged_info = {
            "explain_cli": __version__,
            "status": "complete",
            "merged": True,
            "shards": count,
            "config_file": first.get("config_file"),
            "config": first.get("config"),
            "weights": first.get("weights"),
            "counts": {"images": summary.images, "explained": summary.explained,
                       "failed": summary.failed, "topk_rows": summary.topk_rows},
            "started": min(started) if started else None,
            "finished": max(finished) if finished else None,
            "shard_seconds_total": round(sum(seconds), 3) if seconds else None,
            "versions": first.get("versions"),
            "metrics": _merged_metrics(infos, topk),
            "overlay_scale": _merged_scale(infos),
            "per_shard": per_shard,
            # every shard's run records (reruns included), oldest first
            "runs": sorted((r for info in infos.values() for r in (info.get("runs") or []) if isinstance(r, dict)),
                           key=lambda r: str(r.get("started"))),
        }
        _write_if_changed(output_dir / "topk.csv", _render_csv(TOPK_COLUMNS, topk), summary)
        _write_if_changed(output_dir / "errors.csv", _render_csv(ERROR_COLUMNS, errors), summary)
        _write_if_changed(run_json, json.dumps(merged_info, indent=2, default=str) + "\n", summary)
        _stitch_slides(output_dir, first.get("config"))
    return summary


def _stitch_slides(output_dir: Path, config: Any) -> None:
    """A slide run's heatmaps, from the merged topk.csv: a slide whose tiles ran in several shards
    gets one heatmap (no shard could draw it alone)."""
    slides = config.get("slides") if isinstance(config, dict) else None
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


def _merged_scale(infos: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The shards' ``overlay_scale`` (explain_cli/overlay_scale.py): one entry when they agree
    (the same calibration gives the same limit; 0.1 % allows another device's rounding), else
    each shard's, with a warning: their overlays are then drawn on different scales."""
    import logging

    entries = [info.get("overlay_scale") for _, info in sorted(infos.items())]
    known = [e for e in entries if isinstance(e, dict)]
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
    shown = ", ".join(f"shard {i}: " + (f"{e.get('mode')} {e.get('limit')}" if isinstance(e, dict) else "none")
                      for i, e in enumerate(entries))
    logging.getLogger("explain_cli").warning(
        "merge: the shards drew their overlays on different colour scales (output.scale; %s); rerun the "
        "shards that differ with --overwrite to put them on one", shown)
    return {"mode": "differs", "per_shard": entries}


def _merged_metrics(infos: dict[int, dict[str, Any]], topk: list[list[str]]) -> dict[str, Any] | None:
    """The shards' run.json ``metrics`` combined; the stability median from the merged rows."""
    from explain_cli.metrics import merge_summaries

    column = TOPK_COLUMNS.index("stability")
    stabilities = []
    for row in topk:
        try:
            stabilities.append(float(row[column]))
        except ValueError:
            pass
    return merge_summaries([infos[i].get("metrics") for i in sorted(infos)], stabilities)


def _rank(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
