"""``batch_size``: a fixed number of rows per model call, or ``auto``.

``auto`` keeps today's 64 on the CPU (larger batches buy nothing there and cost memory). On CUDA it
starts at :data:`CUDA_START` rows and lets the out-of-memory back-off halve it until a step
succeeds: that batch size is logged and kept for the rest of the run (a later out-of-memory error
halves it again, with a warning). A step that ran out of memory is redone from scratch, and an
image's numbers never depend on the batch size, so the search changes timings, not results.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

log = logging.getLogger("explain_cli")

CPU_BATCH = 64
# High enough to fill an H100/H200 with lite0-sized rows (224 px); each halving is one failed
# allocation, so starting too high costs well under a second per halving.
CUDA_START = 4096

# Errors that mean "this batch is too large" on CUDA besides torch.cuda.OutOfMemoryError: cuBLAS and
# cuDNN report failed workspace allocations as plain RuntimeErrors.
_OOM_TEXT = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")
# While searching only: kernels that refuse a tensor this large (32-bit indexing) before memory runs out.
_TOO_LARGE_TEXT = ("cudnn_status_not_supported", "32-bit index", "canuse32bitindexmath")


def initial_batch_size(setting: int | str, device: Any) -> tuple[int, bool]:
    """(rows per model call to start with, whether it is an ``auto`` search) for ``device``."""
    if setting != "auto":
        return int(setting), False
    if getattr(device, "type", str(device)) == "cuda":
        return CUDA_START, True
    return CPU_BATCH, False


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
