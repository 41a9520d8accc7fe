"""The tape: records the reference side once, then serves it to the explained chunks by call order."""

from __future__ import annotations

import torch


class ModelMismatch(RuntimeError):
    pass


class Slot:
    """One tensor argument of one recorded call: where the batch sits in it and the reference values.

    The batch need not be the first dimension, nor alone in it: Swin's windows fold it into the first
    dimension (``batch x windows`` rows), torch's multi-head attention runs sequence-first. Comparing
    the shape for one reference (``shape1``) with the shape for ``b`` rows finds the dimension ``dim``
    that grows ``b``-fold; the single-reference tensor (``probe``) then tells whether the batch is the
    outer (the usual ``reshape(B * W, ...)``) or the inner factor of that dimension (``minor``).
    References are stored as ``(B, fold, *rest)``: ``dim`` moved to the front and split.
    """

    __slots__ = ("shape1", "dim", "minor", "probe", "parts", "store")

    def __init__(self, shape1: torch.Size) -> None:
        self.shape1 = shape1
        self.dim: int | None = None  # None until two batch sizes were seen (0 serves one row)
        self.minor = False
        self.probe: torch.Tensor | None = None
        self.parts: list[torch.Tensor] = []
        self.store: torch.Tensor | None = None

    def locate(self, shape: torch.Size, rows: int) -> None:
        """Find ``dim`` from a shape with ``rows`` rows (rows > 1)."""
        differ = [d for d in range(len(shape)) if len(shape) == len(self.shape1) and shape[d] != self.shape1[d]]
        if len(differ) != 1 or shape[differ[0]] != rows * self.shape1[differ[0]]:
            raise ModelMismatch(f"a nonlinear call has shape {tuple(shape)} for {rows} rows and "
                                 f"{tuple(self.shape1)} for one: no dimension holds the batch")
        self.dim = differ[0]

    def _dim(self) -> int:
        return 0 if self.dim is None else self.dim

    def check(self, shape: torch.Size, rows: int) -> None:
        d = self._dim()
        expected = list(self.shape1)
        expected[d] *= rows
        if list(shape) != expected:
            raise ModelMismatch(f"a nonlinear call has shape {tuple(shape)} here and {tuple(expected)} "
                                 f"for the same number of rows on the background")

    def split(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """``x`` (``rows`` rows) as ``(rows, fold, *rest)``."""
        y = x.movedim(self._dim(), 0)
        fold = y.shape[0] // rows
        if self.minor:
            return y.reshape(fold, rows, *y.shape[1:]).transpose(0, 1)
        return y.reshape(rows, fold, *y.shape[1:])

    def join(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`split`."""
        rows, fold = y.shape[:2]
        if self.minor:
            y = y.transpose(0, 1)
        return y.reshape(rows * fold, *y.shape[2:]).movedim(0, self._dim())

    def choose_order(self, x: torch.Tensor, rows: int) -> None:
        """``x`` holds ``rows`` references, the first being the probe's: batch outer or inner factor?"""
        assert self.probe is not None and self.dim is not None
        fold = self.shape1[self.dim]
        if fold > 1:
            y = x.detach().movedim(self.dim, 0)
            target = self.probe.movedim(self.dim, 0)
            outer = (y[:fold] - target).abs().max()
            inner = (y[0::rows] - target).abs().max()
            self.minor = bool(inner < outer)
        self.probe = None


class Tape:
    """Per-call reference values: ``record`` stores them (background), ``explain`` looks them up."""

    def __init__(self) -> None:
        self.phase = "off"
        self.position = 0
        self.calls: list[tuple[str, list[Slot | None]]] = []
        self.rows = 0
        self.probing = False
        self.first = True
        self.ref_index: torch.Tensor | None = None
        self.unsupported: dict[str, int] = {}

    # phases -------------------------------------------------------------------------------
    def start_record(self, rows: int, first: bool, probe: bool = False) -> None:
        """A background chunk of ``rows`` references; ``probe``: the first reference alone, run before
        the chunks only to locate the batch in every call (see :class:`Slot`)."""
        self.phase, self.position, self.rows, self.first, self.probing = "record", 0, rows, first, probe

    def start_explain(self, ref_index: torch.Tensor) -> None:
        self.phase, self.position, self.ref_index = "explain", 0, ref_index
        self.rows = int(ref_index.shape[0])

    def stop(self) -> None:
        self.phase = "off"
        if self.position != len(self.calls):
            raise ModelMismatch(f"the model made {self.position} nonlinear calls on this batch but "
                                 f"{len(self.calls)} on the background")

    def finish_record(self) -> None:
        for _, slots in self.calls:
            for slot in slots:
                if slot is not None:
                    slot.store = torch.cat(slot.parts)
                    slot.parts = []

    # one site -----------------------------------------------------------------------------
    def site(self, kind: str, tensors: tuple[torch.Tensor | None, ...]) -> tuple | None:
        """Record the reference-side tensors (record phase) or return them for this chunk (explain)."""
        t = self.position
        self.position += 1
        if self.phase == "record":
            self._record(t, kind, tensors)
            return None
        return self._recorded(t, kind, tensors)

    def _record(self, t: int, kind: str, tensors: tuple[torch.Tensor | None, ...]) -> None:
        """Record phase: the reference rows of call ``t``'s tensors (the first chunk makes its slots)."""
        if t == len(self.calls):
            if not self.first:
                raise ModelMismatch("the model made more nonlinear calls on this background chunk than "
                                     "on the first one")
            self.calls.append((kind, [None if x is None else Slot(x.shape) for x in tensors]))
        rec_kind, slots = self.calls[t]
        if rec_kind != kind or [s is None for s in slots] != [x is None for x in tensors]:
            raise ModelMismatch(f"nonlinear call {t} is a {kind} here and a {rec_kind} before")
        for slot, x in zip(slots, tensors):
            if slot is None:
                continue
            x = x.detach()
            if self.probing:
                slot.probe = x.clone()
                continue
            if slot.dim is None and self.rows > 1:
                slot.locate(x.shape, self.rows)
                if slot.probe is not None:
                    slot.choose_order(x, self.rows)
            slot.check(x.shape, self.rows)
            slot.parts.append(slot.split(x, self.rows).clone())

    def _recorded(self, t: int, kind: str, tensors: tuple[torch.Tensor | None, ...]) -> tuple:
        """Explain phase: the recorded reference tensors of call ``t``, one per image row of this chunk."""
        if t >= len(self.calls):
            raise ModelMismatch(f"the model made more nonlinear calls on the images than on the background "
                                 f"({len(self.calls)})")
        rec_kind, slots = self.calls[t]
        if rec_kind != kind:
            raise ModelMismatch(f"nonlinear call {t} is a {kind} here and a {rec_kind} on the background")
        out = []
        for x, slot in zip(tensors, slots):
            if x is None or slot is None:
                out.append(None)
                continue
            if slot.dim is None and self.rows > 1:  # one reference, recorded alone: locate the batch now
                slot.locate(x.shape, self.rows)
                assert slot.store is not None
                slot.store = slot.store.movedim(slot.dim + 1, 1)
            slot.check(x.shape, self.rows)
            assert slot.store is not None and self.ref_index is not None
            out.append(slot.join(slot.store.index_select(0, self.ref_index)).to(x.dtype))
        return tuple(out)

    def note_unsupported(self, name: str) -> None:
        self.unsupported[name] = self.unsupported.get(name, 0) + 1
