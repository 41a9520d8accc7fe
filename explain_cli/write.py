"""Write the outputs: atomic files, append-only CSVs flushed per image, run.json.

Every file is written to a temporary name in its own folder and renamed into place, so a
killed job never leaves a half-written overlay, npz or summary. CSV rows of an image are
appended only after its overlay exists, in one write of whole lines followed by flush+fsync,
so after any kill the CSV has no torn line and no image twice (see ``CsvLog``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

TOPK_COLUMNS = [
    "image", "rank", "class_index", "class_name", "probability",
    "output", "base_value", "shap_sum", "additivity_error",
    "stability", "deletion_auc", "insertion_auc",
]
ERROR_COLUMNS = ["image", "error"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_values(path: Path, values: np.ndarray, classes: np.ndarray) -> None:
    """values/<image>.npz: ``values`` float32 (k, C, H, W) and ``classes`` (k,) int64, rank order."""
    buf = io.BytesIO()
    np.savez_compressed(buf, values=values.astype(np.float32), classes=classes.astype(np.int64))
    atomic_write_bytes(path, buf.getvalue())


def _format_row(row: Sequence[Any]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(row)
    return out.getvalue()


def _format_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, np.integer):
        return int(value)
    return value


class CsvLog:
    """An append-only CSV whose rows for one image are written together and made durable.

    Opening an existing file first drops a torn last line (a kill mid-write on a filesystem
    without atomic appends) and, when ``drop_images`` is given, the rows of those images
    (e.g. failures that are being retried), rewriting the file atomically.
    """

    def __init__(self, path: Path, columns: list[str], drop_images: set[str] | None = None) -> None:
        self.path = path
        self.columns = columns
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._repair(drop_images or set())
        if not path.exists() or path.stat().st_size == 0:
            atomic_write_text(path, _format_row(columns))
        self._fh = open(path, "a", encoding="utf-8", newline="")

    def _repair(self, drop: set[str]) -> None:
        text = self.path.read_text(encoding="utf-8")
        complete = text if text.endswith("\n") or not text else text[: text.rfind("\n") + 1]
        if drop:
            rows = list(csv.reader(io.StringIO(complete)))
            kept = [r for i, r in enumerate(rows) if i == 0 or (r and r[0] not in drop)]
            complete = "".join(_format_row(r) for r in kept)
        if complete != text:
            atomic_write_text(self.path, complete)

    def append(self, rows: Iterable[Sequence[Any]]) -> None:
        text = "".join(_format_row([_format_cell(c) for c in row]) for row in rows)
        if text:
            self._fh.write(text)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def read_csv_images(path: Path) -> set[str]:
    """The distinct values of the first column (the image) of a CSV we wrote; empty if missing."""
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.reader(io.StringIO(text)))
    return {r[0] for r in rows[1:] if r}
