"""Write the outputs: atomic files, append-only CSVs flushed per image, run.json.

Every file is written to a temporary name in its own folder and renamed into place, so a
killed job never leaves a half-written overlay, npz or summary. CSV rows of an image are
appended only after its overlay exists, in one write of whole lines followed by flush+fsync,
so after any kill the CSV has no torn line and no image twice (see ``CsvLog``).

Text cells go through ``names.escape`` (any file name, valid UTF-8 or not, round-trips) and
are quoted when they hold a comma, quote, CR or LF; CSVs are read back with ``newline=''``.
Files get the permissions of any normal file (0666 minus the umask), not mkstemp's 0600. A
full disk while appending leaves no torn row: the append is undone and ``OutputError`` raised.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import numpy as np

from explain_cli.names import escape, unescape

TOPK_COLUMNS = [
    "image", "rank", "class_index", "class_name", "probability",
    "output", "base_value", "shap_sum", "additivity_error",
    "stability", "deletion_auc", "insertion_auc",
    "target", "explained", "label", "predicted", "nsamples_used",
    # slide runs (explain_cli/slides); blank otherwise: the tile's slide, level-0 position, the
    # resolution it was read at and its map summed into cells x cells blocks (row-major, spaces)
    "slide", "x", "y", "mpp", "cells",
]
ERROR_COLUMNS = ["image", "error"]


class OutputError(Exception):
    """Writing an output failed in a way no later image can avoid (disk full, read-only
    folder): the run stops with exit 1 and run.json says why."""


#: errno values after which writing more outputs is pointless: the run stops.
FATAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}

_UMASK: int | None = None
_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask, read once (reading it means setting it: done under a lock)."""
    global _UMASK
    with _UMASK_LOCK:
        if _UMASK is None:
            _UMASK = os.umask(0o022)
            os.umask(_UMASK)
        return _UMASK


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 minus the umask."""
    return 0o666 & ~umask()


def is_fatal_os_error(exc: BaseException) -> bool:
    """Disk full, quota exceeded, read-only file system: stop the run instead of failing image after image."""
    return isinstance(exc, OutputError) or (isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS)


def atomic_temp_name(path: Path) -> str:
    """The longest name :func:`atomic_write`'s temporary file for ``path`` can have (its random
    part as 8 characters): for checking up front that the folder takes such a name."""
    return "." + os.fsdecode(os.fsencode(path.name)[:200]) + ".XXXXXXXX.tmp"


def atomic_write(path: Path, write: Callable[[BinaryIO], Any], fsync: bool = False) -> None:
    """The one atomic writer: ``write(fh)`` fills a temporary file in the same folder (mode 0666 &
    ~umask), which then replaces ``path``; a kill or an error leaves the old file (and no temporary
    one). ``fsync``: the data is on disk before the rename (a training state that must survive a
    power cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = "." + os.fsdecode(os.fsencode(path.name)[:200]) + "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), file_mode())
            write(fh)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    """Atomically; on a full disk, overwrite the existing file in place when the new text fits
    (run.json is padded to whole 4 KiB blocks with at least 2 KiB to spare, so its final status,
    counts and metrics can always be recorded)."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str)
    pad = -(len(text.encode("utf-8")) + 1 + 2048) % 4096 + 2048
    body = (text + " " * pad + "\n").encode("utf-8")
    try:
        atomic_write_bytes(path, body)
    except OSError as exc:
        if exc.errno not in FATAL_ERRNOS or not path.is_file():
            raise
        old_size = path.stat().st_size
        if len(text.encode("utf-8")) + 1 > old_size:
            raise
        fd = os.open(path, os.O_WRONLY)
        try:
            data_b = (text + " " * (old_size - len(text.encode("utf-8")) - 1) + "\n").encode("utf-8")
            _write_all(fd, data_b)
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def save_values(path: Path, values: np.ndarray, classes: np.ndarray, segments: np.ndarray | None = None,
                std: np.ndarray | None = None) -> None:
    """values/<image>.npz: ``values`` float32 (k, C, H, W) and ``classes`` (k,) int64, rank order;
    for a superpixel explainer (kernel) also ``segments`` (H, W) int32, the label map it used, and
    ``superpixels``, how many superpixels that is (SLIC may give fewer than explainer.segments);
    with ``std`` (kernel) ``std`` float32 (k, H, W), the estimated standard deviation of each
    pixel's value (its superpixel's, in the units of the channel-summed map)."""
    arrays = {"values": values.astype(np.float32), "classes": classes.astype(np.int64)}
    if segments is not None:
        arrays["segments"] = np.asarray(segments).astype(np.int32)
        arrays["superpixels"] = np.int64(len(np.unique(segments)))
    if std is not None:
        arrays["std"] = np.asarray(std).astype(np.float32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def quote_cell(cell: str) -> str:
    if any(c in cell for c in ',"\r\n'):
        return '"' + cell.replace('"', '""') + '"'
    return cell


def format_row(row: Sequence[Any]) -> str:
    """One CSV line. Like csv.writer's minimal quoting (None is an empty cell), but also quotes a
    bare CR (csv.writer with ``lineterminator='\\n'`` leaves it unquoted, which splits the row
    when read back)."""
    return ",".join(quote_cell(escape(c)) if isinstance(c, str) else "" if c is None else str(c)
                    for c in row) + "\n"

def _format_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    if isinstance(value, np.integer):
        return int(value)
    return value


def complete_prefix(text: str) -> str:
    """``text`` up to the end of its last complete CSV record (a newline outside quotes)."""
    if '"' not in text:
        return text[: text.rfind("\n") + 1]
    end = pos = 0
    odd = False
    for line in text.split("\n")[:-1]:
        pos += len(line) + 1
        odd ^= line.count('"') % 2 == 1
        if not odd:
            end = pos
    return text[:end]


def read_csv_text(path: Path) -> str:
    """A CSV we wrote, exactly as stored (no newline translation: quoted CRs survive)."""
    with open(path, encoding="utf-8", newline="") as fh:
        return fh.read()


def parse_csv(text: str) -> list[list[str]]:
    """Rows of ``text`` (a torn last record is dropped); cells stay escaped (see ``names``)."""
    return list(csv.reader(io.StringIO(complete_prefix(text), newline="")))


class CsvLog:
    """An append-only CSV whose rows for one image are written together and made durable.

    Opening an existing file first drops a torn last record (a kill mid-write on a filesystem
    without atomic appends) and, when ``drop_images`` is given, the rows of those images
    (e.g. failures that are being retried), rewriting the file atomically. An append that
    fails (disk full) is truncated away before ``OutputError`` is raised.
    """

    def __init__(self, path: Path, columns: list[str], drop_images: set[str] | None = None) -> None:
        self.path = path
        self.columns = columns
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            self._repair(drop_images or set())
        if not path.exists() or path.stat().st_size == 0:
            atomic_write_text(path, format_row(columns))
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0))

    def _repair(self, drop: set[str]) -> None:
        text = read_csv_text(self.path)
        complete = complete_prefix(text)
        rows = parse_csv(complete)
        header = rows[0] if rows else self.columns
        if header != self.columns:
            # A file of an earlier version has fewer trailing columns (e.g. no metric columns):
            # pad its rows with blank cells so old and new rows share the current header.
            if header != self.columns[:len(header)]:
                from explain_cli.errors import UserError

                raise UserError(f"{self.path} has columns {header}, not the {self.columns} this version "
                                f"writes; use --overwrite or another output.dir")
            pad = [""] * (len(self.columns) - len(header))
            rows = [self.columns] + [r + pad for r in rows[1:]]
        if drop or header != self.columns:
            kept = [r for i, r in enumerate(rows) if i == 0 or (r and unescape(r[0]) not in drop)]
            complete = "".join(",".join(quote_cell(c) for c in r) + "\n" for r in kept)
        if complete != text:
            atomic_write_text(self.path, complete)

    def append(self, rows: Iterable[Sequence[Any]]) -> None:
        data = "".join(format_row([_format_cell(c) for c in row]) for row in rows).encode("utf-8")
        if not data:
            return
        size = os.fstat(self._fd).st_size
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, size)
            except OSError:
                pass  # the next open drops the torn record
            raise OutputError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def remove_files(paths: Iterable[Path]) -> None:
    """Unlink each path that exists (e.g. overlays of the other format on --overwrite)."""
    for path in paths:
        path.unlink(missing_ok=True)


def read_csv_images(path: Path) -> set[str]:
    """The distinct values of the first column (the image) of a CSV we wrote; empty if missing."""
    if not path.exists():
        return set()
    rows = parse_csv(read_csv_text(path))
    return {unescape(r[0]) for r in rows[1:] if r}


def nonfinite_result(attribution: Any, j: int) -> str | None:
    """Why image ``j`` of an Attribution cannot be written (NaN/inf in its outputs, e.g. from a
    checkpoint holding NaN weights), or None. Such an image becomes an errors.csv row."""
    for name in ("outputs", "probabilities", "base_values", "shap_sum", "values"):
        part = np.asarray(getattr(attribution, name)[j])
        if not np.all(np.isfinite(part)):
            return (f"the model gave non-finite numbers ({name} holds NaN or inf): check the "
                    f"checkpoint and preprocess.mean/std")
    return None
