"""softmax / log_softmax, decomposed into exact rules (row max, exp, sum, reciprocal or log, product)."""

from __future__ import annotations

from typing import Callable

import torch

from explain_cli.explainers.deep.calls import PLAIN, float_tensor, unsupported
from explain_cli.explainers.deep.functions import Product, Rescale, RowMax
from explain_cli.explainers.deep.tape import Tape


def softmax_core(tape: Tape, u: torch.Tensor, dim: int, log_space: bool) -> torch.Tensor:
    """softmax / log_softmax over ``dim`` decomposed into exact rules.

    Each row is shifted by its own maximum (a max node with its own rule, :class:`RowMax`), so
    ``exp`` sees values <= 0 and the row sum lies in [1, n] for the image and the reference alike:
    no factor overflows or underflows and no two large shares cancel. (One shift shared by image and
    reference would be exact as well, but where the two rows' log-sum-exps differ by ``D`` the reference
    row's sum underflows and the shares grow like ``exp(D)`` before they cancel: inf/nan, or 1e-2
    additivity errors, on LeViT's attention with trained batch-norm statistics.)
    """
    refs = tape.site("softmax", (u,))
    if tape.phase == "record":
        return torch.log_softmax(u, dim) if log_space else torch.softmax(u, dim)
    return softmax_against(u, refs[0], dim, log_space)


def softmax_against(u: torch.Tensor, u_r: torch.Tensor, dim: int, log_space: bool = False) -> torch.Tensor:
    """softmax / log_softmax of ``u`` whose backward gives exact DeepLIFT multipliers against the
    reference input ``u_r`` (the decomposition of :func:`softmax_core`)."""
    v = u - RowMax.apply(u, u_r, dim)
    v_r = u_r - u_r.amax(dim, keepdim=True)
    e_r = torch.exp(v_r)
    s_r = e_r.sum(dim, keepdim=True)
    e = Rescale.apply(v, v_r, torch.exp)
    s = e.sum(dim, keepdim=True)
    if log_space:
        return v - Rescale.apply(s, s_r, torch.log)
    inv = Rescale.apply(s, s_r, torch.reciprocal)
    inv_r = torch.reciprocal(s_r)
    return Product.apply(e, inv, (e.detach() + e_r) * 0.5, (inv.detach() + inv_r) * 0.5)


def softmax_rule(log_space: bool, python_f: bool) -> Callable:
    """softmax / log_softmax; ``python_f``: F.softmax(input, dim, _stacklevel, dtype), else
    torch.softmax(input, dim, dtype)."""

    def rule(tape: Tape, func, args, kwargs):
        u = args[0] if args else kwargs.get("input")
        if not (float_tensor(u) and u.requires_grad):
            return PLAIN
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        dtype_pos = 3 if python_f else 2
        dtype = args[dtype_pos] if len(args) > dtype_pos else kwargs.get("dtype")
        if dim is None:
            return unsupported(tape, func)
        if dtype is not None:
            u = u.to(dtype)
        return softmax_core(tape, u, dim, log_space)

    return rule
