"""The decode and write stages around the explainer (``pipeline.run`` wires them).

decode: a thread decodes step i+1 while the main thread explains step i.
write: each explained image becomes a ``WriteJob`` (numpy arrays and strings only); its files
(overlay, values) are written, then its CSV rows appended. A row therefore always means the
image's files exist, whichever process wrote them.

Nothing here imports torch: the write stage runs in worker processes too.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from explain_cli.discover import source_path
from explain_cli.errors import ImageError
from explain_cli.images import load_preprocessed
from explain_cli.write import OutputError, is_fatal_os_error

if TYPE_CHECKING:
    from explain_cli.render import Trust

log = logging.getLogger("explain_cli")


# --- decode -----------------------------------------------------------------------------------

@dataclass
class DecodedStep:
    """One step's images: ``good`` as (rel, display pixels uint8 HxWx3, model input float32 3xHxW),
    ``failed`` as (rel, ImageError)."""

    good: list[tuple[str, np.ndarray, np.ndarray]]
    failed: list[tuple[str, ImageError]]


def decode_one(input_dir: Any, rel: str, preprocess) -> tuple[str, np.ndarray, np.ndarray]:
    """(rel, display pixels, model input) of one image; ImageError when it cannot be read.
    ``input_dir`` is the input folder, or a source that decodes by name (slides.source.TileSource)."""
    decode = getattr(input_dir, "decode", None)
    if decode is not None:
        pixels, tensor = decode(rel, preprocess)
    else:
        pixels, tensor = load_preprocessed(source_path(input_dir, rel), preprocess)
    return rel, pixels, tensor


def decode_step(input_dir: Path, rels: Sequence[str], preprocess) -> DecodedStep:
    step = DecodedStep([], [])
    for rel in rels:
        try:
            step.good.append(decode_one(input_dir, rel, preprocess))
        except ImageError as exc:
            step.failed.append((rel, exc))
    return step


#: Longest one image may take to read and decode before it becomes an errors.csv row (a read that
#: hangs on a stalled network file system never returns). Far above a real decode: the largest
#: image Pillow accepts (its decompression-bomb limit, ~179 Mpx) decodes in seconds.
DECODE_TIMEOUT_S = 120.0


class _ChunkDecode:
    """One decode thread's work on one step, from image ``position`` on; the consumer may
    abandon it (a hung image), taking over what it decoded so far."""

    def __init__(self, index: int, position: int, step: DecodedStep) -> None:
        self.index = index
        self.position = position
        self.started = time.monotonic()  # of the image at ``position``
        self.step = step
        self.abandoned = False
        self.lock = threading.Lock()

    def run(self, input_dir: Path, rels: Sequence[str], preprocess, results: queue.Queue) -> None:
        try:
            for pos in range(self.position, len(rels)):
                with self.lock:
                    if self.abandoned:
                        return
                    self.position, self.started = pos, time.monotonic()
                try:
                    item, bad = decode_one(input_dir, rels[pos], preprocess), None
                except ImageError as exc:
                    item, bad = None, (rels[pos], exc)
                with self.lock:
                    if self.abandoned:
                        return
                    if bad is None:
                        self.step.good.append(item)
                    else:
                        self.step.failed.append(bad)
            with self.lock:
                self.position = len(rels)
            results.put((self, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            results.put((self, exc))

    def take_over_if_hung(self, rels: Sequence[str], timeout: float) -> DecodedStep | None:
        """When the current image has taken longer than ``timeout``: abandon this thread and
        return what it decoded, the hung image as failed, for the next thread to continue."""
        with self.lock:
            if self.abandoned or self.position >= len(rels) or time.monotonic() - self.started <= timeout:
                return None
            self.abandoned = True
            rel = rels[self.position]
            reason = ImageError(f"reading and decoding took longer than {timeout:g} s (a hung read, "
                                f"e.g. a stalled network file system?); skipped")
            return DecodedStep(list(self.step.good), list(self.step.failed) + [(rel, reason)])


def decoded_steps(input_dir: Path, todo: list[str], step: int, preprocess,
                  stop: Callable[[], bool] = lambda: False, poll: float = 0.25,
                  timeout: float | None = None) -> Iterator[DecodedStep]:
    """Decode ``todo`` in steps of ``step`` images, one step ahead of the consumer (a thread:
    Pillow's decoding and numpy release the GIL).

    The consumer never waits on the decoder blindly: while a step is not ready it checks
    ``stop()`` every ``poll`` seconds and ends the iteration when it says so, so a stop request
    ends the run within seconds even if a read hangs (a stalled network file system). An image
    that takes longer than ``timeout`` (default DECODE_TIMEOUT_S) becomes a failed image of its
    step and a new thread goes on with the next one; the hung thread is a daemon, abandoned (a
    hung read cannot be cancelled, and cannot keep the process alive).
    """
    timeout = DECODE_TIMEOUT_S if timeout is None else timeout
    chunks = [todo[i:i + step] for i in range(0, len(todo), step)]
    if not chunks:
        return
    results: queue.Queue = queue.Queue()

    def start(index: int, position: int, partial: DecodedStep) -> _ChunkDecode:
        work = _ChunkDecode(index, position, partial)
        threading.Thread(target=work.run, args=(input_dir, chunks[index], preprocess, results),
                         name="decode", daemon=True).start()
        return work

    work = start(0, 0, DecodedStep([], []))
    try:
        for i in range(len(chunks)):
            current = None
            while current is None:
                try:
                    done, error = results.get(timeout=poll)
                except queue.Empty:
                    if stop():
                        return
                    partial = work.take_over_if_hung(chunks[i], timeout)
                    if partial is not None:
                        resume_at = len(partial.good) + len(partial.failed)
                        if resume_at < len(chunks[i]):
                            work = start(i, resume_at, partial)
                        else:
                            current = partial
                    continue
                if done is not work:
                    continue  # an abandoned thread whose read came back after all
                if error is not None:
                    raise error
                current = done.step
            if i + 1 < len(chunks):
                work = start(i + 1, 0, DecodedStep([], []))
            yield current
    finally:
        with work.lock:
            work.abandoned = True


# --- write ------------------------------------------------------------------------------------

@dataclass
class WriteJob:
    """One image's files, as plain data (picklable for a worker process)."""

    rel: str
    pixels: np.ndarray              # uint8 (H, W, 3), the image as the model saw it
    values: np.ndarray              # float32 (k, C, h, w)
    titles: list[str]
    overlay_path: str | None        # None: no overlay (slide tiles without slides.overlays)
    fmt: str
    dpi: int
    segments: np.ndarray | None = None
    values_path: str | None = None  # values/<image>.npz when output.save_values
    classes: np.ndarray | None = None
    style: str = "gray"             # output.style
    caption: str = ""               # the overlay's bottom line (image, explainer, layer)
    value_std: np.ndarray | None = None  # float32 (k, h, w) std of each pixel's value (kernel), into the npz
    limit: float | None = None      # output.scale's colour limit (None: the image's own)
    trust: list[Trust] | None = None  # per class: stability, additivity error, output, base (render.Trust)


def write_files(job: WriteJob) -> None:
    """Values first (when asked), then the overlay: the overlay's existence marks the image as
    written, and its CSV rows come after both."""
    from explain_cli.render import render_overlay
    from explain_cli.write import save_values

    if job.values_path is not None:
        save_values(Path(job.values_path), job.values, job.classes, job.segments, job.value_std)
    if job.overlay_path is not None:
        render_overlay(job.pixels, job.values, job.titles, Path(job.overlay_path), fmt=job.fmt,
                       dpi=job.dpi, segments=job.segments, style=job.style, caption=job.caption,
                       limit=job.limit, trust=job.trust)


def _worker_init(parent_pid: int) -> None:
    """In each writer process: leave SIGINT/SIGTERM to the main process (a terminal's Ctrl-C and
    Slurm's SIGTERM reach every process of the job; the main process finishes the writes in
    flight, then shuts the pool down), and exit if the main process disappears (SIGKILL, OOM
    kill), so no worker is ever orphaned."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by the parent while it spawned us

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    import explain_cli.render  # noqa: F401  (pay the renderer's imports now, not on the first image)


def _ready() -> int:
    return os.getpid()


@dataclass
class _Pending:
    """An image in the write stage, in submission order: its job and rows, and either the
    worker's future or (in-process) the outcome: None for success or the exception."""

    job: WriteJob | None
    rows: list[list[Any]]
    future: Future | None = None
    error: BaseException | str | None = None

    def done(self) -> bool:
        return self.future is None or self.future.done()


class Writer:
    """The write stage: writes each image's files, then appends its rows to topk.csv; a failure
    becomes a row of errors.csv. Counts every image in ``summary`` and ``progress``.

    With ``workers`` > 0 the files are written by that many worker processes ('spawn': a fork
    after torch has started its threads can deadlock) while the main process explains the next
    step. Results are collected in submission order, so topk.csv and errors.csv list images in
    the same order as with ``workers: 0``, and the rows of the images collected together are
    appended in one write + fsync (in-process: one per image, as before workers existed). At most ``max_pending`` images are in flight (their pixels
    and values held in memory): past that, ``submit`` waits for the oldest.
    """

    def __init__(self, topk_log, errors_log, summary, progress, workers: int = 0,
                 max_pending: int = 16) -> None:
        self.topk_log = topk_log
        self.errors_log = errors_log
        self.summary = summary
        self.progress = progress
        self.workers = workers
        self.max_pending = max(1, max_pending)
        self._pending: deque[_Pending] = deque()
        self._pool: ProcessPoolExecutor | None = None
        if workers > 0:
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                             initializer=_worker_init, initargs=(os.getpid(),))
            # Start every worker now, so their start-up overlaps loading the background and
            # the first explain step (the pool would otherwise start one per submit).
            with _stop_signals_blocked():
                for _ in range(workers):
                    self._pool.submit(_ready)

    def failed(self, rel: str, message: str) -> None:
        """An image that never reached its files (decode or explain failed)."""
        self._pending.append(_Pending(None, [[rel, message]], error=message))

    def submit(self, job: WriteJob, rows: list[list[Any]]) -> None:
        """Write ``job``'s files (here or in a worker); its ``rows`` follow once they exist."""
        if self._pool is None:
            entry = _Pending(job, rows)
            try:
                write_files(job)
            except Exception as exc:  # noqa: BLE001 - a file system or rendering failure loses this image only
                entry.error = exc
        else:
            with _stop_signals_blocked():
                entry = _Pending(job, rows, future=self._pool.submit(write_files, job))
        self._pending.append(entry)
        while len(self._pending) > self.max_pending:
            self._collect(wait_for=len(self._pending) - self.max_pending)

    def end_step(self) -> None:
        """Record every image whose files are done (in order), without waiting."""
        self._collect(wait_for=0)

    def drain(self) -> None:
        """Finish every image in flight."""
        self._collect(wait_for=len(self._pending))

    def close(self, force: bool = False) -> None:
        """Stop the workers; ``force`` (a second signal): at once, dropping images in flight."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        if force:
            self._pending.clear()
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.kill()  # workers ignore SIGTERM; their files are written atomically
        pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, wait_for: int) -> None:
        """Record finished images from the front of the queue, waiting for the first ``wait_for``."""
        topk_rows: list[list[list[Any]]] = []  # per image
        error_rows: list[list[Any]] = []
        explained = failed = 0
        fatal: OutputError | None = None
        while self._pending and (wait_for > 0 or self._pending[0].done()):
            entry = self._pending.popleft()
            wait_for -= 1
            error = entry.error
            if entry.future is not None:
                error = entry.future.exception()
                if isinstance(error, BrokenProcessPool):
                    error = self._write_here(entry.job)
            if isinstance(error, BaseException) and is_fatal_os_error(error):
                # a full disk fails every later image too: record the images before it, then stop
                fatal = OutputError(f"cannot write the outputs of {entry.rows[0][0]!r}: "
                                    f"{getattr(error, 'strerror', None) or error}")
                fatal.__cause__ = error
                break
            if error is None:
                topk_rows.append(entry.rows)
                explained += 1
                continue
            message = error if isinstance(error, str) else f"cannot write outputs: {type(error).__name__}: {error}"
            rel = entry.rows[0][0]
            log.warning("%s: %s", rel, message)
            error_rows.append([rel, message])
            failed += 1
        if self.workers:  # one write + fsync for all the images collected together
            self.topk_log.append([row for rows in topk_rows for row in rows])
        else:  # in-process: one append per image, as before workers existed
            for rows in topk_rows:
                self.topk_log.append(rows)
        self.errors_log.append(error_rows)
        self.summary.explained += explained
        self.summary.failed += failed
        if explained + failed:
            self.progress.update(explained + failed)
        if fatal is not None:
            raise fatal

    def _write_here(self, job: WriteJob) -> BaseException | None:
        """A worker died (killed, out of memory): write in this process from now on."""
        if self._pool is not None:
            log.warning("a writer process died; writing the remaining overlays in the main process")
            self.close()
        try:
            write_files(job)
        except Exception as exc:  # noqa: BLE001
            return exc
        return None


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1}


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while a worker may be spawned: the child inherits the blocked mask,
    so a signal arriving before its initializer has set them to 'ignore' cannot kill it (that
    would break the pool). The main process gets the held signals right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
