"""The job around the stages: which images (shard), where (device), who may write (lock), when to
stop (signals), how many CPUs it may use (workers, torch threads), and what run.json records.

None of this touches an image; ``pipeline.run`` wires it around decode -> explain -> write.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import os
import platform
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from explain_cli import __version__
from explain_cli.errors import UserError

log = logging.getLogger("explain_cli")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based): every ``count``-th image of the sorted list,
    starting at ``index`` (round-robin, so shards get similar mixes of folders)."""

    index: int
    count: int

    @property
    def suffix(self) -> str:
        return f".shard-{self.index}-of-{self.count}"

    @staticmethod
    def parse(text: str) -> "Shard":
        try:
            i, n = (int(p) for p in text.split("/"))
        except ValueError:
            raise UserError(f"--shard: expected I/N (e.g. 0/4), got {text!r}") from None
        if n < 1 or not 0 <= i < n:
            raise UserError(f"--shard: need 0 <= I < N, got {text!r}")
        return Shard(i, n)

    @staticmethod
    def from_slurm(env: Mapping[str, str] | None = None) -> "Shard | None":
        """The shard of a Slurm array task (arrays may start at 1: ids are offset by the minimum)."""
        env = os.environ if env is None else env
        task = env.get("SLURM_ARRAY_TASK_ID")
        count = env.get("SLURM_ARRAY_TASK_COUNT")
        if task is None or count is None:
            return None
        low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        high = env.get("SLURM_ARRAY_TASK_MAX")
        index, n = int(task) - low, int(count)
        if not 0 <= index < n or (high is not None and int(high) - low + 1 != n):
            # e.g. --array=0,2,5 or 0-7:2: task ids are not 0..N-1 (+MIN), shards would overlap
            raise UserError(f"Slurm array task {task} of {count} (ids {low}-{high}): explain-cli needs "
                            f"a contiguous array (--array=0-{n - 1} or 1-{n}, no gaps or steps); "
                            f"or give --shard I/N")
        return Shard(index, n)

    def select(self, items: list[str]) -> list[str]:
        return items[self.index::self.count]


def resolve_device(name: str):
    """'auto' picks CUDA when available. 'cuda' is the current device: the one Slurm or
    CUDA_VISIBLE_DEVICES exposes first."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device: '{name}' requested but CUDA is not available on this machine")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device: '{name}' does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
        return dev
    return torch.device("cpu")


class StopFlag:
    """SIGTERM/SIGINT set a flag checked between steps; a second signal stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = name
        log.warning("%s received: finishing the current step, then stopping", name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def output_lock(output_dir: Path, suffix: str) -> Iterator[None]:
    """One run per shard and output folder: a second one exits 2 instead of interleaving."""
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f".explain-cli{suffix}.lock"
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another explain-cli run is writing to {output_dir} "
                            f"(lock {path.name} is held); wait for it or use another output.dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"explain-cli": __version__, "python": platform.python_version()}
    for pkg in ("torch", "torchvision", "timm", "shap", "numpy", "pillow", "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def device_info(device) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["torch_threads"] = torch.get_num_threads()
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
