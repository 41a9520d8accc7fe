"""What every rule shares: the ``PLAIN`` answer, the unsupported report, and argument inspection.

A rule is ``rule(tape, func, args, kwargs) -> result or PLAIN`` (PLAIN: run the call unchanged).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from explain_cli.explainers.deep.tape import Tape


PLAIN = object()  # a rule's answer: "run the call unchanged"


def call_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a tensor property (x.T, x.mT): name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def unsupported(tape: Tape, func: Any) -> object:
    """A nonlinear call on input-dependent tensors that no rule covers: plain gradient, reported."""
    if tape.phase == "explain":
        tape.note_unsupported(call_name(func))
    return PLAIN


def needs_grad(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return any(needs_grad(o) for o in obj)
    return False


def dependent_count(obj: Any) -> int:
    """How many input-dependent tensors ``obj`` holds (one: the call is linear in it)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return sum(dependent_count(o) for o in obj)
    if isinstance(obj, dict):
        return sum(dependent_count(o) for o in obj.values())
    return 0


def float_grad_output(obj: Any) -> bool:
    """A floating-point tensor that depends on the input, alone or inside a tuple/list/dict result."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad and obj.is_floating_point()
    if isinstance(obj, (list, tuple)):
        return any(float_grad_output(o) for o in obj)
    if isinstance(obj, dict):
        return any(float_grad_output(o) for o in obj.values())
    return False


def float_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.is_floating_point()


def apply_rule(tape: Tape, rule: Callable, func: Callable, args: tuple, kwargs: dict | None = None):
    """A rule inside a composite rule: its result, or the plain call where it answers ``PLAIN``."""
    kwargs = kwargs or {}
    out = rule(tape, func, args, kwargs)
    return func(*args, **kwargs) if out is PLAIN else out


def bind_args(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a builtin (no Python signature) by name."""
    params = dict(defaults)
    params.update(zip(names, args))
    params.update(kwargs)
    return params
