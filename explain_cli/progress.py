"""Progress for people and for log files: a tqdm bar on a terminal, plain timed lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("explain_cli")


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts images done. Cron and Slurm logs get a line every ``interval`` seconds with
    done/total, images/s and ETA; a terminal gets a tqdm bar; ``enabled=False`` is silent."""

    def __init__(self, total: int, enabled: bool = True, interval: float = 5.0, stream=None) -> None:
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.interval = interval
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self._last = self.start
        self._bar = None
        if enabled and total and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = _fmt_seconds(eta) if rate > 0 else "?"
        return (f"progress: {self.done}/{self.total} images, {rate:.2f} images/s, "
                f"elapsed {_fmt_seconds(elapsed)}, ETA {eta_s}")

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.done >= self.total:
            self._last = now
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
