"""The decode and write stages around the explainer (``pipeline.run`` wires them).

decode: a thread decodes step i+1 while the main thread explains step i.
write: each explained image becomes a ``WriteJob`` (numpy arrays and strings only); its files
(overlay, values) are written, then its CSV rows appended. A row therefore always means the
image's files exist, whichever process wrote them.

Nothing here imports torch: the write stage runs in worker processes too.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

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
            pixels, tensor = load_preprocessed(input_dir / rel, preprocess)
            step.good.append((rel, pixels, tensor))
        except ImageError as exc:
            step.failed.append((rel, exc))
    return step


def decoded_steps(input_dir: Path, todo: list[str], step: int, preprocess) -> Iterator[DecodedStep]:
    """Decode ``todo`` in steps of ``step`` images, one step ahead of the consumer (a thread:
    Pillow's decoding and numpy release the GIL)."""
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending = pool.submit(decode_step, input_dir, chunks[0], preprocess) if chunks else None
        for i in range(len(chunks)):
            current = pending.result()
            pending = pool.submit(decode_step, input_dir, chunks[i + 1], preprocess) if i + 1 < len(chunks) else None
            try:
                yield current
            except GeneratorExit:
                if pending is not None:
                    pending.cancel()
                raise


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
            self.failed(job.rel, f"cannot write outputs: {type(exc).__name__}: {exc}")
            return
        self.topk_log.append(rows)
        self.summary.explained += 1
        self.progress.update(1)

    def drain(self) -> None:
        """Finish every image in flight."""

    def close(self, force: bool = False) -> None:
        """Release the stage; ``force``: stop at once, dropping images in flight."""
