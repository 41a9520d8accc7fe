"""The decode and write stages around the explainer (``pipeline.run`` wires them).

decode: a thread decodes step i+1 while the main thread explains step i.
write: each explained image becomes a ``WriteJob`` (numpy arrays and strings only); its files
(overlay, values) are written, then its CSV rows appended. A row therefore always means the
image's files exist, whichever process wrote them.

Nothing here imports torch: the write stage runs in worker processes too.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from explain_cli.discover import source_path
from explain_cli.errors import ImageError
from explain_cli.images import load_preprocessed

log = logging.getLogger("explain_cli")


# --- decode -----------------------------------------------------------------------------------

@dataclass
class DecodedStep:
    """One step's images: ``good`` as (rel, display pixels uint8 HxWx3, model input float32 3xHxW),
    ``failed`` as (rel, ImageError)."""

    good: list[tuple[str, np.ndarray, np.ndarray]]
    failed: list[tuple[str, ImageError]]


def decode_step(input_dir: Path, rels: Sequence[str], preprocess) -> DecodedStep:
    step = DecodedStep([], [])
    for rel in rels:
        try:
            pixels, tensor = load_preprocessed(source_path(input_dir, rel), preprocess)
            step.good.append((rel, pixels, tensor))
        except ImageError as exc:
            step.failed.append((rel, exc))
    return step


def decoded_steps(input_dir: Path, todo: list[str], step: int, preprocess,
                  stop: Callable[[], bool] = lambda: False, poll: float = 0.25) -> Iterator[DecodedStep]:
    """Decode ``todo`` in steps of ``step`` images, one step ahead of the consumer (a thread:
    Pillow's decoding and numpy release the GIL).

    The consumer never waits on the decoder blindly: while a step is not ready it checks
    ``stop()`` every ``poll`` seconds and ends the iteration when it says so, so a stop request
    ends the run within seconds even if a read hangs (a stalled network file system). The
    decoder is a daemon thread for the same reason: a hung read cannot keep the process alive.
    """
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    if not chunks:
        return
    requests: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()
    closed = threading.Event()

    def decoder() -> None:
        while True:
            index = requests.get()
            if index is None or closed.is_set():
                return
            try:
                results.put((index, decode_step(input_dir, chunks[index], preprocess), None))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                results.put((index, None, exc))

    thread = threading.Thread(target=decoder, name="decode", daemon=True)
    thread.start()
    requests.put(0)
    try:
        for i in range(len(chunks)):
            while True:
                try:
                    index, current, error = results.get(timeout=poll)
                    break
                except queue.Empty:
                    if stop():
                        return
            if error is not None:
                raise error
            requests.put(i + 1 if i + 1 < len(chunks) else None)
            yield current
    finally:
        closed.set()
        requests.put(None)


# --- write ------------------------------------------------------------------------------------

@dataclass
class WriteJob:
    """One image's files, as plain data (picklable for a worker process)."""

    rel: str
    pixels: np.ndarray              # uint8 (H, W, 3), the image as the model saw it
    values: np.ndarray              # float32 (k, C, h, w)
    titles: list[str]
    overlay_path: str
    fmt: str
    dpi: int
    segments: np.ndarray | None = None
    values_path: str | None = None  # values/<image>.npz when output.save_values
    classes: np.ndarray | None = None


def write_files(job: WriteJob) -> None:
    """Values first (when asked), then the overlay: the overlay's existence marks the image as
    written, and its CSV rows come after both."""
    from explain_cli.render import render_overlay
    from explain_cli.write import save_values

    if job.values_path is not None:
        save_values(Path(job.values_path), job.values, job.classes)
    render_overlay(job.pixels, job.values, job.titles, Path(job.overlay_path), fmt=job.fmt,
                   dpi=job.dpi, segments=job.segments)


class Writer:
    """The write stage: writes each image's files, then appends its rows to topk.csv; a failure
    becomes a row of errors.csv. Counts every image in ``summary`` and ``progress``."""

    def __init__(self, topk_log, errors_log, summary, progress) -> None:
        self.topk_log = topk_log
        self.errors_log = errors_log
        self.summary = summary
        self.progress = progress

    def failed(self, rel: str, message: str) -> None:
        """An image that never reached its files (decode or explain failed)."""
        self.errors_log.append([[rel, message]])
        self.summary.failed += 1
        self.progress.update(1)
        log.warning("%s: %s", rel, message)

    def submit(self, job: WriteJob, rows: list[list[Any]]) -> None:
        try:
            write_files(job)
        except Exception as exc:  # noqa: BLE001 - a file system or rendering failure loses this image only
            from explain_cli.write import OutputError, is_fatal_os_error

            if is_fatal_os_error(exc):  # a full disk fails every later image too: stop the run
                raise OutputError(f"cannot write the outputs of {job.rel!r}: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from exc
            self.failed(job.rel, f"cannot write outputs: {type(exc).__name__}: {exc}")
            return
        self.topk_log.append(rows)
        self.summary.explained += 1
        self.progress.update(1)

    def drain(self) -> None:
        """Finish every image in flight."""

    def close(self, force: bool = False) -> None:
        """Release the stage; ``force``: stop at once, dropping images in flight."""
