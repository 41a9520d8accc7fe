"""Elementwise functions ``y = g(u)`` (activations, exp/log, powers, clamp, ...): the rescale rule."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from explain_cli.explainers.deep.calls import PLAIN, float_tensor, needs_grad, unsupported
from explain_cli.explainers.deep.functions import Rescale
from explain_cli.explainers.deep.tape import Tape


def apply_unary(tape: Tape, u: torch.Tensor, g: Callable, inplace: bool):
    refs = tape.site("unary", (u,))
    if tape.phase == "record":
        return g(u) if (inplace and u.is_leaf) else PLAIN
    y = Rescale.apply(u, refs[0], g)
    if inplace and not u.is_leaf:
        u.copy_(y)
        return u
    return y


def unary_rule(oop: Callable, inplace: bool | None) -> Callable:
    """Elementwise ``oop(u, *rest)``. ``inplace=None``: Python function with an ``inplace`` parameter."""
    signature = inspect.signature(oop) if inplace is None else None

    def rule(tape: Tape, func, args, kwargs):
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            params = dict(bound.arguments)
            first = next(iter(signature.parameters))
            u = params.pop(first)
            is_inplace = bool(params.pop("inplace", False))
            if any(needs_grad(v) for v in params.values()):
                return unsupported(tape, func)
            g = lambda t: oop(t, **params)  # noqa: E731
        else:
            u, rest = args[0], args[1:]
            is_inplace = bool(inplace)
            if needs_grad(rest) or any(needs_grad(v) for v in kwargs.values()):
                return unsupported(tape, func)
            g = lambda t: oop(t, *rest, **kwargs)  # noqa: E731
        if not float_tensor(u) or not u.requires_grad:
            return PLAIN
        return apply_unary(tape, u, g, is_inplace)

    return rule


def inplace_twin(oop: Callable) -> Callable:
    """Rule for ``F.<name>_`` (in place): the out-of-place Python functional with ``inplace=True``."""
    signature = inspect.signature(oop)

    def rule(tape: Tape, func, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        params = dict(bound.arguments)
        params["inplace"] = True
        return unary_rule(oop, None)(tape, oop, (), params)

    return rule


def pow_rule(oop: Callable, inplace: bool, reflected: bool = False) -> Callable:
    def rule(tape: Tape, func, args, kwargs):
        if kwargs or len(args) != 2:
            return unsupported(tape, func) if needs_grad((args, tuple(kwargs.values()))) else PLAIN
        base_, exp_ = (args[1], args[0]) if reflected else args
        if needs_grad(base_) and not needs_grad(exp_) and float_tensor(base_):
            return apply_unary(tape, base_, lambda t: oop(t, exp_) if not reflected else oop(exp_, t), inplace)
        if needs_grad(exp_) and not needs_grad(base_) and float_tensor(exp_):
            g = (lambda t: torch.pow(base_, t))
            return apply_unary(tape, exp_, g, False)
        return unsupported(tape, func) if needs_grad(args) else PLAIN

    return rule
