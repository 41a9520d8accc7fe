"""Max pooling and maxima over a dimension: shap's rule, the output difference goes to the image's
winner when it is >= 0 and to the reference's winner otherwise (per window, or per row)."""

from __future__ import annotations

from typing import Callable

import torch

from explain_cli.explainers.deep.calls import PLAIN, bind_args, float_tensor, needs_grad, unsupported
from explain_cli.explainers.deep.functions import MaxPool, RowMax
from explain_cli.explainers.deep.tape import Tape


def maxpool_rule(with_indices: Callable, n_args: int, ndim: int) -> Callable:
    """``with_indices`` is the ``*_with_indices`` twin (same leading positional parameters); ``ndim``
    the batched input's number of dimensions."""

    def rule(tape: Tape, func, args, kwargs):
        u = args[0] if args else kwargs.get("input")
        if not (float_tensor(u) and u.requires_grad):
            return PLAIN
        kw = dict(kwargs)
        kw.pop("input", None)
        rest = list(args[1:])
        want_indices = bool(kw.pop("return_indices", False))
        if len(rest) >= n_args:  # return_indices given positionally
            want_indices = bool(rest[n_args - 1])
            rest = rest[:n_args - 1]
        if u.dim() != ndim:
            return unsupported(tape, func)
        pool = lambda t: with_indices(t, *rest, **kw)  # noqa: E731
        refs = tape.site("maxpool", (u,))
        if tape.phase == "record":
            return PLAIN
        out, idx = MaxPool.apply(u, refs[0], pool)
        return (out, idx) if want_indices else out

    return rule


def maxpool_rule_indices(with_indices: Callable, ndim: int) -> Callable:
    inner = maxpool_rule(with_indices, 10**6, ndim)

    def rule(tape, func, args, kwargs):
        kw = dict(kwargs)
        kw.pop("return_indices", None)
        result = inner(tape, func, tuple(args[:6]) if len(args) > 6 else args, {**kw, "return_indices": True})
        return result

    return rule


def max_rule(negate: bool, builtin: str) -> Callable:
    """``amax``/``amin`` (``builtin`` "amax") and ``max``/``min`` over a dim ("max", values and the
    image's indices) by the row-max rule; ``maximum``/``minimum`` ("maximum") as the max of a stacked
    pair. A max over everything (the batch too) is left to the unsupported path."""

    def rule(tape: Tape, func, args, kwargs):
        if builtin == "maximum":
            p = bind_args(("input", "other"), {}, args, kwargs)
            a, b = p.get("input"), p.get("other")
            if not (needs_grad(a) or needs_grad(b)) or "out" in kwargs:
                return PLAIN if not needs_grad((a, b)) else unsupported(tape, func)
            if not (float_tensor(a) and float_tensor(b)):
                return unsupported(tape, func)
            u = torch.stack(torch.broadcast_tensors(a, b))
            dim, keep, want_indices = 0, False, False
        else:
            p = bind_args(("input", "dim", "keepdim"), {"dim": None, "keepdim": False}, args, kwargs)
            if isinstance(p["dim"], torch.Tensor):  # torch.max(a, b): the elementwise maximum
                return max_rule(negate, "maximum")(tape, func, args, kwargs)
            u, dim, keep = p.get("input"), p["dim"], bool(p["keepdim"])
            if not (float_tensor(u) and u.requires_grad):
                return PLAIN
            if dim is None or "out" in kwargs or isinstance(dim, (list, tuple)) and len(dim) != 1:
                return unsupported(tape, func)
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            want_indices = builtin == "max"
        if negate:
            u = -u
        refs = tape.site("max", (u,))
        if tape.phase == "record":
            c, idx = u.max(dim, keepdim=True)
        else:
            c = RowMax.apply(u, refs[0], dim)
            idx = u.detach().argmax(dim, keepdim=True) if want_indices else None
        c = -c if negate else c
        if not keep:
            c = c.squeeze(dim)
            idx = idx.squeeze(dim) if want_indices else None
        if want_indices:
            return (torch.return_types.max if not negate else torch.return_types.min)((c, idx))
        return c

    return rule
