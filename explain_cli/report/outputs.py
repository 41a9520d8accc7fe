"""Reading a run's output folder for the report: run.json (or the shards'), topk.csv (or the
shards'), errors.csv; every part read defensively (a missing or unreadable part is left out)."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from explain_cli.errors import UserError
from explain_cli.record import RunRecord, RunRecordError
from explain_cli.write import parse_csv, read_csv_text

log = logging.getLogger("explain_cli")

_SHARD = re.compile(r"^(topk|errors|run)\.shard-(\d+)-of-(\d+)\.(csv|json)$")


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
    """A run.json as record.RunRecord reads it leniently (each entry of its kind; a malformed one left
    out, with a warning), as JSON data; None when it cannot be read at all."""
    try:
        record = RunRecord.read(path, lenient=True)
    except RunRecordError as exc:
        log.warning("report: cannot read %s (%s); left out", path, exc.problem)
        return None
    for entry, problem in record.dropped.items():
        log.warning("report: %s: %s is malformed (%s); left out", path, entry, problem)
    return record.dump()


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
