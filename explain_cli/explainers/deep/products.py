"""Products of two input-dependent tensors: ``a * b``, ``a / b``, matmul/einsum, addmm, addcmul, and
linear/conv with an input-dependent weight. All bilinear: each factor gets the other's mean over
image and reference (exact, and the Shapley value of the two factors)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from explain_cli.explainers.deep.calls import PLAIN, apply_rule, bind_args, dependent_count, float_tensor, \
    needs_grad, unsupported
from explain_cli.explainers.deep.functions import Product, Rescale, bilinear
from explain_cli.explainers.deep.tape import Tape


def mul_rule(inplace: bool) -> Callable:
    def rule(tape: Tape, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return unsupported(tape, func) if dependent_count((args, kwargs)) > 1 else PLAIN
        a, b = args
        if not (float_tensor(a) and float_tensor(b) and a.requires_grad and b.requires_grad):
            return PLAIN
        refs = tape.site("product", (a, b))
        if tape.phase == "record":
            return (a * b) if (inplace and a.is_leaf) else PLAIN
        a_r, b_r = refs
        y = Product.apply(a, b, (a.detach() + a_r) * 0.5, (b.detach() + b_r) * 0.5)
        if inplace and not a.is_leaf:
            a.copy_(y)
            return a
        return y

    return rule


def div_rule(inplace: bool, reflected: bool = False) -> Callable:
    def rule(tape: Tape, func, args, kwargs):
        if len(args) != 2 or (kwargs and kwargs.get("rounding_mode") is not None):
            return unsupported(tape, func) if needs_grad(args) else PLAIN
        a, b = (args[1], args[0]) if reflected else args
        if not (float_tensor(b) and b.requires_grad):
            return PLAIN  # dividing by a constant is linear (a scalar / tensor is a unary rule)
        if needs_grad(a) and not float_tensor(a):
            return PLAIN
        a_dep = isinstance(a, torch.Tensor) and a.requires_grad
        refs = tape.site("divide", (a if a_dep else None, b))
        if tape.phase == "record":
            return (a / b) if (inplace and a.is_leaf) else PLAIN
        a_r, b_r = refs
        inv_r = torch.reciprocal(b_r)
        inv = Rescale.apply(b, b_r, torch.reciprocal)
        if a_dep:
            y = Product.apply(a, inv, (a.detach() + a_r) * 0.5, (inv.detach() + inv_r) * 0.5)
        else:
            y = a * inv
        if inplace and a_dep and not a.is_leaf:
            a.copy_(y)
            return a
        return y

    return rule


def bilinear_rule(h_of: Callable[[tuple, dict], tuple[Callable, torch.Tensor, torch.Tensor] | None]) -> Callable:
    def rule(tape: Tape, func, args, kwargs):
        parts = h_of(args, kwargs)
        if parts is None:  # a form without a rule (more operands, out=): fine while linear
            return unsupported(tape, func) if dependent_count((args, kwargs)) > 1 else PLAIN
        h, a, b = parts
        if not (float_tensor(a) and float_tensor(b) and a.requires_grad and b.requires_grad):
            return PLAIN
        refs = tape.site("bilinear", (a, b))
        if tape.phase == "record":
            return PLAIN
        a_r, b_r = refs
        return bilinear(h, a, b, (a.detach() + a_r) * 0.5, (b.detach() + b_r) * 0.5)

    return rule


def matmul_parts(fn: Callable):
    def parts(args, kwargs):
        if len(args) != 2 or kwargs:
            return None
        return fn, args[0], args[1]
    return parts


def einsum_parts(args, kwargs):
    if kwargs or len(args) < 2 or not isinstance(args[0], str):
        return None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2:
        return None
    equation = args[0]
    return (lambda p, q: torch.einsum(equation, p, q)), operands[0], operands[1]


MATMUL = bilinear_rule(matmul_parts(torch.matmul))


def addmm_rule(product: Callable) -> Callable:
    """``baddbmm``/``addbmm``/``addmm``/``addmv``/``addr`` = ``beta * input + alpha * product(a, b)``."""

    def rule(tape: Tape, func, args, kwargs):
        p = bind_args(("input", "m1", "m2"), {"beta": 1, "alpha": 1}, args, kwargs)
        names = [n for n in p if n not in ("input", "beta", "alpha")]
        if len(names) != 2 or "out" in p:
            return unsupported(tape, func) if needs_grad(args) else PLAIN
        a, b = p[names[0]], p[names[1]]
        if not (needs_grad(a) and needs_grad(b)):
            return PLAIN  # linear in the one input-dependent factor
        out = apply_rule(tape, bilinear_rule(matmul_parts(product)), product, (a, b))
        return p["beta"] * p["input"] + p["alpha"] * out if p["beta"] != 0 else p["alpha"] * out

    return rule


def addcmul_rule(tape: Tape, func, args, kwargs):
    """``input + value * t1 * t2``."""
    p = bind_args(("input", "tensor1", "tensor2"), {"value": 1}, args, kwargs)
    t1, t2 = p.get("tensor1"), p.get("tensor2")
    if "out" in kwargs or t1 is None or t2 is None:
        return unsupported(tape, func) if needs_grad(args) else PLAIN
    if not (needs_grad(t1) and needs_grad(t2)):
        return PLAIN
    return p["input"] + p["value"] * apply_rule(tape, mul_rule(False), torch.mul, (t1, t2))


def weighted_rule(fn: Callable, names: tuple[str, ...]) -> Callable:
    """``linear``/``conv*`` whose weight depends on the input too (dynamic kernels: CondConv's routed
    weights): bilinear in (input, weight), plus the bias; with a constant weight, linear."""

    def rule(tape: Tape, func, args, kwargs):
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if not (isinstance(weight, torch.Tensor) and weight.requires_grad):
            return PLAIN  # the usual case (a module's frozen weight): called often, so decided first
        p = bind_args(names, {}, args, kwargs)
        u = p.get("input")
        if not needs_grad(u):
            return PLAIN
        rest = {k: v for k, v in p.items() if k not in ("input", "weight", "bias")}
        h = lambda x, w: fn(x, w, None, **rest)  # noqa: E731
        out = apply_rule(tape, bilinear_rule(lambda a, kw: (h, a[0], a[1])), h, (u, weight))
        bias = p.get("bias")
        if bias is None:
            return out
        return out + (bias if fn is F.linear else bias.reshape([1, -1] + [1] * (out.dim() - 2)))

    return rule
