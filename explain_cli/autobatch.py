"""``batch_size``: a fixed number of rows per model call, or ``auto``.

On CUDA ``auto`` starts at :data:`CUDA_START` rows and lets the out-of-memory back-off halve it
until a step succeeds: that batch size is logged and kept for the rest of the run (a later
out-of-memory error halves it again, with a warning). A step that ran out of memory is redone
from scratch.

On the CPU ``auto`` measures (:func:`plan_cpu`, :class:`BatchProbe`). A memory bound first: the
rows whose activations (estimated from one one-row forward pass) fit :data:`CPU_CALL_BYTES`, or a
:data:`MEMORY_SHARE` of the memory the job may still use (MemAvailable, cgroup, Slurm) when that is
less; a large CPU batch buys no speed but costs page faults and memory a Slurm job pays for. Then
the run's first model calls are the probe: each candidate size (powers of two up to the bound) is
timed :data:`PROBE_ROUNDS` times, interleaved, and the run keeps the smallest size within
:data:`PROBE_TOLERANCE` of the fastest per row. The probe's calls are the run's own work.

Either way an image's numbers never depend on the batch size, so the search changes timings, not
results.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger("explain_cli")

# High enough to fill an H100/H200 with lite0-sized rows (224 px); each halving is one failed
# allocation, so starting too high costs well under a second per halving.
CUDA_START = 4096

# Errors that mean "this batch is too large" on CUDA besides torch.cuda.OutOfMemoryError: cuBLAS and
# cuDNN report failed workspace allocations as plain RuntimeErrors.
_OOM_TEXT = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")
# While searching only: kernels that refuse a tensor this large (32-bit indexing) before memory runs out.
_TOO_LARGE_TEXT = ("cudnn_status_not_supported", "32-bit index", "canuse32bitindexmath")

#: Activation bytes one CPU model call may use (the estimate of :func:`activation_bytes_per_row`
#: times its rows). For the demo model that is 16 rows with a backward pass: peak RSS 1.9 GB and
#: 2-3% system time, against 3.8 GB and 15% at the former 64 (2 cores, docs/performance.md); on a
#: quiet machine 16 was also the fastest fixed size, on a loaded one larger batches were faster.
CPU_CALL_BYTES = 2**30
#: At most this share of the memory the job may still use goes to one model call's activations.
MEMORY_SHARE = 0.25
#: Candidate sizes: the powers of two up to the memory bound (and PROBE_MAX), at least PROBE_MIN
#: rows, at most PROBE_SIZES of them (the largest), so that probing stays a small share of a run.
#: A loop with fewer rows than the planned size is one call anyway and is not a measurement.
PROBE_MIN = 16  # 8 rows: 2.25x the wall time of 16 for gradient at load 2 (bench/results-cpu-batch.txt)
PROBE_MAX = 256
PROBE_SIZES = 3
PROBE_ROUNDS = 2
PROBE_TOLERANCE = 0.05


def initial_batch_size(setting: int | str, device: Any) -> tuple[int, bool]:
    """(rows per model call to start with, whether it is a CUDA out-of-memory search) for
    ``device``. On the CPU ``auto`` gives (0, False): :func:`plan_cpu` decides."""
    if setting != "auto":
        return int(setting), False
    if getattr(device, "type", str(device)) == "cuda":
        return CUDA_START, True
    return 0, False


def activation_bytes_per_row(model: Any, example: Any, backward: bool) -> int:
    """Estimated memory of one row (one image) in a model call, from one forward pass of
    ``example`` (a batch of one) with hooks on the leaf modules; in-place outputs count once.
    With ``backward``: their sum (the outputs are kept for the backward pass); without: 4x the
    largest (a forward pass holds only a few at a time). Calibrated on the demo model: peak RSS
    grew about 44 MB per row with a backward pass to blocks.2 (estimate 51) and 17 MB forward only
    (estimate 18; docs/performance.md)."""
    import torch

    sizes: dict[int, int] = {}
    held: list = []  # every output stays alive, so that no address is reused for another one

    def hook(module, inputs, output) -> None:
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                held.append(t)
                sizes[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        held.clear()
    rows = max(1, int(example.shape[0]))
    if not sizes:
        return 0
    return (sum(sizes.values()) if backward else 4 * max(sizes.values())) // rows


def memory_bound(bytes_per_row: int, headroom: int | None) -> tuple[int, int]:
    """(most rows per call, the byte budget they fit): CPU_CALL_BYTES, or MEMORY_SHARE of the
    job's memory headroom when that is less; at least one row."""
    budget = CPU_CALL_BYTES if headroom is None else min(CPU_CALL_BYTES, int(MEMORY_SHARE * headroom))
    return max(1, budget // max(1, bytes_per_row)), budget


def probe_candidates(bound: int) -> list[int]:
    """The sizes the probe times: powers of two from PROBE_MIN up to ``bound`` and PROBE_MAX (the
    largest PROBE_SIZES of them); just ``[bound]`` when it is below PROBE_MIN."""
    sizes = []
    size = PROBE_MIN
    while size <= min(bound, PROBE_MAX):
        sizes.append(size)
        size *= 2
    return sizes[-PROBE_SIZES:] or [bound]


@dataclass
class BatchProbe:
    """Times the first model calls of a run at each candidate size, then keeps the best.

    ``plan`` is the candidate sizes, ``rounds`` times over (interleaved, so a change of the
    machine's load hits every size alike). A call whose rows equal the planned size is recorded
    (seconds per row) and the plan moves on; shorter calls (the tail of a loop) are not
    measurements. Each size's best round counts (first calls at a size pay one-off costs: page
    faults, kernel selection); the choice is the smallest size within ``tolerance`` of the fastest.
    """

    candidates: list[int]
    rounds: int = PROBE_ROUNDS
    tolerance: float = PROBE_TOLERANCE
    clock: Callable[[], float] = time.perf_counter
    per_row: dict[int, list[float]] = field(default_factory=dict)
    choice: int | None = None
    bytes_per_row: int = 0
    budget: int = 0

    def __post_init__(self) -> None:
        self.plan = [size for _ in range(self.rounds) for size in self.candidates]
        if len(self.candidates) == 1:
            self.plan, self.choice = [], self.candidates[0]

    @property
    def done(self) -> bool:
        return self.choice is not None

    def size(self, fallback: int) -> int:
        """Rows for the next model call: the planned size while probing, else ``fallback``."""
        return fallback if self.done else self.plan[0]

    def record(self, rows: int, seconds: float) -> bool:
        """Count a call of ``rows`` rows that took ``seconds``; True when it ended the probe."""
        if self.done or rows != self.plan[0]:
            return False
        self.per_row.setdefault(rows, []).append(seconds / rows)
        self.plan.pop(0)
        if self.plan:
            return False
        best = {size: min(times) for size, times in self.per_row.items()}
        fastest = min(best.values())
        self.choice = min(size for size, t in best.items() if t <= fastest * (1 + self.tolerance))
        return True

    def summary(self) -> dict[str, Any]:
        """What run.json records of the probe."""
        return {"candidates": self.candidates, "chosen": self.choice,
                "ms_per_row": {str(s): round(1000 * min(t), 3) for s, t in sorted(self.per_row.items())},
                "activation_mb_per_row": round(self.bytes_per_row / 2**20, 1),
                "memory_budget_mb": round(self.budget / 2**20)}


def call_size(ctx: Any) -> int:
    """Rows for the context's next model call (the probe's plan while it measures)."""
    probe = getattr(ctx, "batch_probe", None)
    size = int(ctx.batch_size) if probe is None else probe.size(int(ctx.batch_size))
    return max(1, size)


@contextlib.contextmanager
def timed_call(ctx: Any, rows: int) -> Iterator[None]:
    """Wrap one model call of ``rows`` rows: while the probe measures, it is timed and recorded;
    when that ends the probe, the context keeps the chosen batch size."""
    probe = getattr(ctx, "batch_probe", None)
    if probe is None or probe.done:
        yield
        return
    began = probe.clock()
    yield
    if probe.record(rows, probe.clock() - began):
        ctx.batch_size = probe.choice
        log.info("batch_size auto: %d rows per model call on %s (probed %s ms per row; at most %d rows: "
                 "%.0f MB of activations per row, budget %.0f MB)", probe.choice, getattr(ctx, "device", "cpu"),
                 ", ".join(f"{s}: {1000 * min(t):.1f}" for s, t in sorted(probe.per_row.items())),
                 probe.candidates[-1], probe.bytes_per_row / 2**20, probe.budget / 2**20)


def plan_cpu(ctx: Any, example: Any, backward: bool, headroom: int | None,
             clock: Callable[[], float] = time.perf_counter) -> BatchProbe:
    """Set up ``batch_size: auto`` on the CPU for ``ctx``: the memory bound from ``example`` (one
    preprocessed row), the probe on ``ctx.batch_probe``, and ``ctx.batch_size`` = the bound (for
    the calls the probe does not time) until the probe chooses."""
    per_row = activation_bytes_per_row(ctx.model, example, backward)
    bound, budget = memory_bound(per_row, headroom)
    candidates = probe_candidates(bound)
    probe = BatchProbe(candidates, clock=clock, bytes_per_row=per_row, budget=budget)
    ctx.batch_probe = probe
    ctx.batch_size = candidates[-1] if probe.choice is None else probe.choice
    if probe.done:
        log.info("batch_size auto: %d rows per model call on the CPU (memory bound: %.0f MB of activations "
                 "per row, budget %.0f MB)", probe.choice, per_row / 2**20, budget / 2**20)
    return probe


def is_oom(exc: BaseException, searching: bool = False) -> bool:
    """Whether ``exc`` says the batch did not fit (``searching``: also "too large to index")."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(t in text for t in _OOM_TEXT) or (searching and any(t in text for t in _TOO_LARGE_TEXT))


def explain_with_backoff(explainer, batch, targets, seeds: Sequence[int]):
    """Explain a batch; on out-of-memory halve the model batch size and retry, down to 1.

    While an ``auto`` search is on, halvings are part of the plan (logged at info level); the
    first success ends it and logs the batch size the run keeps.
    """
    ctx = explainer.context
    while True:
        searching = bool(getattr(ctx, "batch_size_auto", False))
        try:
            result = explainer.explain(batch, targets, seeds)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled here
            if not is_oom(exc, searching) or ctx.batch_size <= 1:
                raise
            new = max(1, ctx.batch_size // 2)
            (log.info if searching else log.warning)(
                "out of memory at batch_size %d; retrying with %d", ctx.batch_size, new)
            ctx.batch_size = new
        else:
            if searching:
                ctx.batch_size_auto = False
                log.info("batch_size auto: %d rows per model call on %s", ctx.batch_size,
                         getattr(ctx, "device", "the device"))
            return result
        # Outside the except block: the exception's frames (and the tensors they hold) are gone,
        # so the cached blocks can really be released before the retry.
        _release(getattr(ctx, "device", None))


def _release(device: Any) -> None:
    import gc

    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
