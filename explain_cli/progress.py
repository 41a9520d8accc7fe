"""Progress for people and for log files: a tqdm bar on a terminal, plain timed lines otherwise.

Both count model evaluations inside an image (the explainers report each model call through
``explainers._utils.count_evaluations``), so an image that needs minutes (partition with
thousands of evaluations) moves the bar and keeps the log lines coming: a heartbeat thread
prints a line every ``interval`` seconds whatever the explainer is doing.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("explain_cli")

#: Seconds between progress lines in a log (docs/batch-jobs.md promises one at least every 5 s).
LINE_INTERVAL = 5.0


def format_seconds(seconds: float) -> str:
    """'1:02:03' (h:mm:ss), '2:03' (m:ss) below an hour: progress lines' elapsed times and ETAs."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts images done and model evaluations. Cron and Slurm logs get a line every ``interval``
    seconds (images done/total, evaluations done/total, evaluations/s, ETA) from a heartbeat
    thread, and one when the last image is done; a terminal gets a tqdm bar that advances with
    each model call; ``enabled=False`` is silent."""

    def __init__(self, total: int, enabled: bool = True, interval: float | None = None, stream=None) -> None:
        self.total = total
        self.done = 0
        self.evaluations = 0
        self.per_image: int | None = None  # model evaluations per image (the explainer's estimate)
        self.enabled = enabled and total > 0
        self.interval = LINE_INTERVAL if interval is None else interval
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._first_eval: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None
        self._bar_evals = 0
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    # -- counting ------------------------------------------------------------------------------

    def set_evaluations_per_image(self, per_image: int | None) -> None:
        """The explainer's cost of one image; starts the bar (terminal) or the heartbeat (log)."""
        self.per_image = per_image if per_image and per_image > 0 else None
        if not self.enabled or self._bar is not None or self._thread is not None:
            return
        if self._tty:
            from tqdm import tqdm

            total = self.total_evaluations
            self._bar = tqdm(total=total or self.total, unit="eval" if total else "img",
                             file=self.stream, dynamic_ncols=True, desc=self._images())
        else:
            self._thread = threading.Thread(target=self._beat, name="progress", daemon=True)
            self._thread.start()

    @property
    def total_evaluations(self) -> int | None:
        return self.per_image * self.total if self.per_image else None

    def evaluated(self, rows: int) -> None:
        """``rows`` model evaluations done (a listener of ``_utils.counting_evaluations``)."""
        with self._lock:
            if self._first_eval is None:
                self._first_eval = time.monotonic()
            self.evaluations += rows
        if self._bar is not None and self.total_evaluations:
            step = min(rows, self.total_evaluations - self._bar_evals)
            if step > 0:
                self._bar_evals += step
                self._bar.update(step)

    def update(self, n: int = 1) -> None:
        """``n`` more images done (written or failed)."""
        with self._lock:
            self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description(self._images(), refresh=False)
            if not self.total_evaluations:
                self._bar.update(n)
            return
        if self._thread is None and self.done >= self.total:
            self._print()  # no heartbeat was started (no explainer): the last line still comes

    # -- lines ---------------------------------------------------------------------------------

    def _images(self) -> str:
        return f"{self.done}/{self.total} img"

    def line(self) -> str:
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.start
            done, evaluations, total_evals = self.done, self.evaluations, self.total_evaluations
            busy = now - self._first_eval if self._first_eval is not None else 0.0
        text = f"progress: {done}/{self.total} images"
        eta = float("nan")
        if evaluations or total_evals:
            shown = min(evaluations, total_evals) if total_evals else evaluations
            text += f", {shown}/{total_evals if total_evals else '?'} model evaluations"
            rate = evaluations / busy if busy > 0 else 0.0
            text += f", {rate:.1f} evaluations/s"
            if total_evals and rate > 0:
                eta = max(0.0, total_evals - evaluations) / rate
        else:
            rate = done / elapsed if elapsed > 0 else 0.0
            text += f", {rate:.2f} images/s"
            if rate > 0:
                eta = (self.total - done) / rate
        if done >= self.total:
            eta = 0.0
        eta_s = format_seconds(eta) if eta == eta else "?"
        return f"{text}, elapsed {format_seconds(elapsed)}, ETA {eta_s}"

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self._print()

    def close(self) -> None:
        """Stop the heartbeat (a last line when images were done since the previous one) or the bar."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self.enabled and self.done:
                self._print()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
