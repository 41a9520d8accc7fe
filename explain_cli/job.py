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
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from explain_cli import __version__
from explain_cli.errors import UserError

if TYPE_CHECKING:
    from explain_cli.record import RunEntry

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


#: Signals that stop a run cleanly (finish the step, record "interrupted", resumable). SIGHUP is
#: what a dropped ssh session sends: a hang-up is a stop request like any other.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class StopRequested(BaseException):
    """Raised at the next model call after a stop signal (``StopFlag.check``): the step in flight is
    dropped (its images are redone by the rerun), everything before it is written. A BaseException,
    so the per-image retry of a failed batch (``except Exception``) does not swallow it."""


class StopFlag:
    """SIGTERM/SIGINT/SIGHUP/SIGUSR1 set a flag; the run stops at the next model call (``check``),
    not at the end of the step (a step can be minutes of model calls on a CPU); a second signal
    stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = name
        log.warning("%s received: finishing the current model call, then stopping", name)

    def check(self, _rows: int = 0) -> None:
        """Raise StopRequested once a stop signal came (called after every model call)."""
        if self.signal_name is not None:
            raise StopRequested(self.signal_name)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopFlag"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


def _holder(path: Path) -> str:
    """' (pid N)' from a lock file (the run that wrote it), or '' when there is none."""
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def _flock(fh, shared: bool = False) -> bool:
    """Take ``fh``'s lock without waiting (shared or exclusive); False when another process holds it."""
    import fcntl

    try:
        fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def lock_held(path: Path) -> bool:
    """Whether a run (or merge) holds the lock file ``path`` now (never creates the file)."""
    import fcntl

    try:
        fh = open(path, "r")
    except (FileNotFoundError, NotADirectoryError):
        return False
    with fh:
        if not _flock(fh):
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _running_shards(output_dir: Path) -> list[str]:
    """'shard I/N (pid P)' for each shard whose lock is held now."""
    held = []
    for path in sorted(output_dir.glob(".explain-cli.shard-*-of-*.lock")):
        try:
            if lock_held(path):
                i, n = path.name[len(".explain-cli.shard-"):-len(".lock")].split("-of-")
                held.append(f"shard {i}/{n}{_holder(path)}")
        except (OSError, ValueError):
            continue
    return held


@contextlib.contextmanager
def output_lock(output_dir: Path, suffix: str, merging: bool = False) -> Iterator[None]:
    """One run per shard and output folder: a second one exits 2 instead of interleaving.

    ``.explain-cli.lock`` is taken exclusively by an unsharded run and by merge (``merging``) and
    shared by every shard run, so an unsharded run and shard runs never write into one folder
    together; each shard also holds its own lock. The refusal names the run that holds the folder.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    main_path = output_dir / ".explain-cli.lock"
    main = open(main_path, "a+")
    own = open(output_dir / f".explain-cli{suffix}.lock", "a+") if suffix else main
    try:
        if not _flock(main, shared=bool(suffix)):
            if merging:
                raise UserError(f"another explain-cli run or merge is writing to {output_dir} (lock "
                                f"{main_path.name} is held{_holder(main_path)}); wait for it")
            if suffix:
                other = f"an unsharded run or a merge{_holder(main_path)}"
            else:
                other = ", ".join(_running_shards(output_dir)) or f"another run or merge{_holder(main_path)}"
            raise UserError(f"another explain-cli run is writing to {output_dir}: {other}; sharded and "
                            f"unsharded runs cannot share an output folder: wait for it or use another "
                            f"output.dir")
        if not _flock(own):
            raise UserError(f"another explain-cli run is writing to {output_dir} (lock {Path(own.name).name} "
                            f"is held{_holder(Path(own.name))}); wait for it or use another output.dir")
        own.seek(0)
        own.truncate()
        own.write(f"{os.getpid()}\n")
        own.flush()
        yield
    finally:
        if own is not main:
            own.close()
        main.close()


# --- CPUs: what the job may use, and how it is shared ----------------------------------------

#: ``workers: auto`` starts no worker processes for a run of at most this many images: starting
#: one (a fresh interpreter importing numpy and Pillow: ~0.4 s of CPU measured, the price of
#: 10-40 overlays) does not pay off in a run that is over after two steps.
AUTO_WORKERS_MIN_IMAGES = 16


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _self_and_ancestors(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and each folder above it up to ``base``, where they exist. In a container
    without a cgroup namespace /proc/self/cgroup names the host's path while ``base`` already is
    the container's cgroup: then only ``base`` exists, and it is the one that counts."""
    parts = [p for p in rel.split("/") if p and p != ".."]
    return [d for d in (base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)) if d.is_dir()]


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup ("" is cgroup v2's unified one)."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) == 3:
            for controller in fields[1].split(","):
                paths[controller] = fields[2]
    return paths


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"),
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs allowed by a CPU quota on this process's cgroup or any cgroup above it (v2
    ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``); None when there is none."""
    paths = _cgroup_paths(proc_cgroup)
    limits = []
    if (root / "cgroup.controllers").exists():  # v2: one unified hierarchy
        for folder in _self_and_ancestors(root, paths.get("", "/")):
            quota, _, period = (_read(folder / "cpu.max") or "max").partition(" ")
            if quota.isdigit() and period.isdigit() and int(period) > 0:
                limits.append(int(quota) / int(period))
    else:  # v1: the cpu controller's own hierarchy
        for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
            if (root / mount).is_dir():
                for folder in _self_and_ancestors(root / mount, paths.get("cpu", "/")):
                    try:
                        quota = int(_read(folder / "cpu.cfs_quota_us") or "-1")
                        period = int(_read(folder / "cpu.cfs_period_us") or "0")
                    except ValueError:
                        continue
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
                break
    return min(limits) if limits else None


def usable_cores(affinity: set[int] | None = None, env: Mapping[str, str] | None = None,
                 cgroup_root: Path = Path("/sys/fs/cgroup"),
                 proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this job may use, not the node's: the smallest of the process's CPU affinity,
    SLURM_CPUS_PER_TASK and the cgroup CPU quota (rounded up: 1.5 CPUs of quota -> 2). At least 1."""
    env = os.environ if env is None else env
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = set(range(os.cpu_count() or 1))
    counts = [len(affinity)]
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        counts.append(int(slurm))
    quota = cgroup_cpu_limit(cgroup_root, proc_cgroup)
    if quota is not None:
        counts.append(math.ceil(quota - 1e-9))
    return max(1, min(counts))


def _cgroup_memory_headroom(root: Path, proc_cgroup: Path) -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup or one above it (v2
    ``memory.max - memory.current``, v1 ``memory.limit_in_bytes - memory.usage_in_bytes``)."""
    paths = _cgroup_paths(proc_cgroup)
    if (root / "cgroup.controllers").exists():
        folders, files = _self_and_ancestors(root, paths.get("", "/")), ("memory.max", "memory.current")
    elif (root / "memory").is_dir():
        folders = _self_and_ancestors(root / "memory", paths.get("memory", "/"))
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes")
    else:
        return None
    left = []
    for folder in folders:
        limit, used = (_read(folder / f) or "" for f in files)
        if limit.isdigit() and used.isdigit() and int(limit) < 2**60:  # v1 writes "no limit" as ~2**63
            left.append(max(0, int(limit) - int(used)))
    return min(left) if left else None


def memory_headroom(env: Mapping[str, str] | None = None, meminfo: Path = Path("/proc/meminfo"),
                    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                    rss: int | None = None) -> int | None:
    """Bytes this job may still allocate, where known: the smallest of the node's MemAvailable,
    the cgroup memory limit's headroom and the Slurm allocation (SLURM_MEM_PER_NODE, or
    SLURM_MEM_PER_CPU x SLURM_CPUS_PER_TASK, in MB) minus this process's resident memory."""
    env = os.environ if env is None else env
    left = []
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:") and line.split()[1].isdigit():
            left.append(int(line.split()[1]) * 1024)
    cgroup = _cgroup_memory_headroom(cgroup_root, proc_cgroup)
    if cgroup is not None:
        left.append(cgroup)
    per_node, per_cpu = env.get("SLURM_MEM_PER_NODE", ""), env.get("SLURM_MEM_PER_CPU", "")
    cpus = env.get("SLURM_CPUS_PER_TASK", "1")
    slurm = None
    if per_node.isdigit() and int(per_node) > 0:
        slurm = int(per_node)
    elif per_cpu.isdigit() and int(per_cpu) > 0:
        slurm = int(per_cpu) * (int(cpus) if cpus.isdigit() and int(cpus) > 0 else 1)
    if slurm is not None:
        if rss is None:
            statm = (_read(Path("/proc/self/statm")) or "0 0").split()
            rss = int(statm[1]) * os.sysconf("SC_PAGE_SIZE") if len(statm) > 1 and statm[1].isdigit() else 0
        left.append(max(0, slurm * 2**20 - rss))
    return min(left) if left else None


def resolve_workers(setting: int | str, usable: int, images: int) -> int:
    """Writer processes for a run: ``auto`` = usable cores minus one (the main process decodes
    and explains), none for runs of at most AUTO_WORKERS_MIN_IMAGES images; never more than
    there are images to write."""
    if setting == "auto":
        wanted = usable - 1 if images > AUTO_WORKERS_MIN_IMAGES else 0
    else:
        wanted = int(setting)
    return max(0, min(wanted, images))


def torch_threads(usable: int, workers: int, env: Mapping[str, str] | None = None) -> int | None:
    """torch's intra-op threads: the usable cores the workers leave (at least 1), so that
    workers and torch do not fight over the same cores. None (leave torch alone) when
    OMP_NUM_THREADS is set: the user's explicit choice wins."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable - workers)


def share_cpus(setting: int | str, images: int) -> dict[str, int]:
    """Decide the writer processes for a run of ``images`` images and set torch's thread count
    to match; returns what run.json records (usable_cores, workers, torch_threads)."""
    import torch

    cores = usable_cores()
    workers = resolve_workers(setting, cores, images)
    threads = torch_threads(cores, workers)
    if threads is not None:
        torch.set_num_threads(threads)
    log.info("%d usable CPU core(s): %d writer process(es), %d torch thread(s)",
             cores, workers, torch.get_num_threads())
    return {"usable_cores": cores, "workers": workers, "torch_threads": torch.get_num_threads()}


# --- memory: keep freed memory in the process ---------------------------------------------

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations from this size on get their own mmap (glibc's ceiling for the threshold on 64-bit).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap is returned to the system only beyond this.
TRIM_THRESHOLD = 2**30
#: ``EXPLAIN_CLI_NO_MALLOPT=1`` in the environment leaves glibc's allocator at its defaults (an
#: environment variable, not a config key: the setting is the process's, made before any config is read,
#: and holds for an embedding program's other work too).
NO_MALLOPT_ENV = "EXPLAIN_CLI_NO_MALLOPT"
_allocator_tuned = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for the next model call instead of returning it (once per
    process; True when set). By default every large tensor is a fresh mmap, unmapped on free, so
    each model call page-faults its whole working set in again: on 2 cores that cost more system
    time than the arithmetic (docs/performance.md). Other C libraries are left alone, and so is
    glibc when :data:`NO_MALLOPT_ENV` is set to anything but '' or '0'."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get(NO_MALLOPT_ENV, "").strip() not in ("", "0"):
        log.debug("%s set: glibc's malloc thresholds left at their defaults", NO_MALLOPT_ENV)
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, ValueError, OSError, TypeError):  # not glibc, or no confstr name here
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _allocator_tuned


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


#: run.json keeps the records of at most this many runs into a folder (newest last).
MAX_RUN_RECORDS = 200


def earlier_runs(run_json: Path) -> list[RunEntry]:
    """The run records of an earlier run.json in this folder (``runs``, newest last); a run.json
    written before records existed becomes one record. [] when there is none, it is unreadable, or
    it is a merge's; malformed entries are left out (the run rewrites the file)."""
    from explain_cli.record import RunRecord, RunRecordError

    try:
        info = RunRecord.read(run_json, lenient=True)
    except RunRecordError:
        return []
    if info.merged:
        return []
    if info.runs is not None:
        return info.runs[-(MAX_RUN_RECORDS - 1):]
    if info.started:
        return [info.run_entry(None)]
    return []
