"""Normalisations by the input's own statistics (layer, group, instance, RMS norm, ``F.normalize``) and
vector norms: centring is linear, the square a product, the (inverse) square root a rescale, the
result a product."""

from __future__ import annotations

import math
from typing import Callable

import torch

from explain_cli.explainers.deep.calls import PLAIN, bind_args, float_tensor, needs_grad, unsupported
from explain_cli.explainers.deep.functions import Product, Rescale
from explain_cli.explainers.deep.tape import Tape


def _normalized(u: torch.Tensor, u_r: torch.Tensor, dims: tuple[int, ...], eps: float,
                center: bool = True) -> torch.Tensor:
    """``(u - mean) / sqrt(mean((u - mean)^2) + eps)`` over ``dims`` (``center=False``: RMS norm),
    as a product of two input-dependent factors, the square by the product rule and the inverse
    square root by the rescale rule."""
    d = u - u.mean(dims, keepdim=True) if center else u
    d_r = u_r - u_r.mean(dims, keepdim=True) if center else u_r
    d_bar = (d.detach() + d_r) * 0.5
    var = Product.apply(d, d, d_bar, d_bar).mean(dims, keepdim=True) + eps
    var_r = (d_r * d_r).mean(dims, keepdim=True) + eps
    inv = Rescale.apply(var, var_r, torch.rsqrt)
    inv_r = torch.rsqrt(var_r)
    return Product.apply(d, inv, d_bar, (inv.detach() + inv_r) * 0.5)


def _affine(out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
            channel_dim: int | None = None) -> torch.Tensor:
    """Scale and shift, per trailing element or (``channel_dim``) per channel."""
    shape = None
    if channel_dim is not None:
        shape = [1] * out.dim()
        shape[channel_dim] = -1
    if weight is not None:
        out = out * (weight if shape is None else weight.reshape(shape))
    if bias is not None:
        out = out + (bias if shape is None else bias.reshape(shape))
    return out


_LAYER_NORM_ARGS = ("input", "normalized_shape", "weight", "bias", "eps")
_GROUP_NORM_ARGS = ("input", "num_groups", "weight", "bias", "eps")
_INSTANCE_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum",
                       "eps")
_RMS_NORM_ARGS = ("input", "normalized_shape", "weight", "eps")


def _norm_input(tape: Tape, func, params: dict) -> tuple[torch.Tensor, torch.Tensor] | object | None:
    """The input of a normalisation and its reference, ``PLAIN`` (nothing to do, or record) or
    ``unsupported`` (input-dependent weights)."""
    u = params["input"]
    if not (float_tensor(u) and u.requires_grad):
        return PLAIN
    if any(needs_grad(params.get(k)) for k in ("weight", "bias")):
        return unsupported(tape, func)
    refs = tape.site("norm", (u,))
    if tape.phase == "record":
        return PLAIN
    return u, refs[0]


def _trailing_dims(normalized_shape) -> tuple[int, ...]:
    """The dims layer_norm/rms_norm normalise over: the last len(normalized_shape) ones."""
    return tuple(range(-(1 if isinstance(normalized_shape, int) else len(normalized_shape)), 0))


def layer_norm_rule(tape: Tape, func, args, kwargs):
    params = bind_args(_LAYER_NORM_ARGS, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    got = _norm_input(tape, func, params)
    if got is PLAIN:
        return got
    u, u_r = got
    return _affine(_normalized(u, u_r, _trailing_dims(params["normalized_shape"]), params["eps"]),
                   params["weight"], params["bias"])


def rms_norm_rule(tape: Tape, func, args, kwargs):
    params = bind_args(_RMS_NORM_ARGS, {"weight": None, "eps": None}, args, kwargs)
    got = _norm_input(tape, func, params)
    if got is PLAIN:
        return got
    u, u_r = got
    eps = params["eps"] if params["eps"] is not None else torch.finfo(u.dtype).eps
    return _affine(_normalized(u, u_r, _trailing_dims(params["normalized_shape"]), eps, center=False),
                   params["weight"], None)


def group_norm_rule(tape: Tape, func, args, kwargs):
    """Layer norm over each group of channels (and all positions), then the per-channel affine map."""
    params = bind_args(_GROUP_NORM_ARGS, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    got = _norm_input(tape, func, params)
    if got is PLAIN:
        return got
    u, u_r = got
    shape = (u.shape[0], params["num_groups"], -1)
    out = _normalized(u.reshape(shape), u_r.reshape(shape), (-1,), params["eps"]).reshape(u.shape)
    return _affine(out, params["weight"], params["bias"], channel_dim=1)


def instance_norm_rule(tape: Tape, func, args, kwargs):
    params = bind_args(_INSTANCE_NORM_ARGS, {"running_mean": None, "running_var": None, "weight": None,
                                         "bias": None, "use_input_stats": True, "momentum": 0.1, "eps": 1e-5},
                   args, kwargs)
    if not params["use_input_stats"]:
        return PLAIN  # running statistics: linear
    if params["running_mean"] is not None and needs_grad(params["input"]):
        return unsupported(tape, func)  # training mode (updates the statistics)
    got = _norm_input(tape, func, params)
    if got is PLAIN:
        return got
    u, u_r = got
    dims = tuple(range(2, u.dim()))
    return _affine(_normalized(u, u_r, dims, params["eps"]), params["weight"], params["bias"], channel_dim=1)


def normalize_rule(tape: Tape, func, args, kwargs):
    """F.normalize, p = 2: ``u * (1 / max(sqrt(sum u^2), eps))``."""
    params = bind_args(("input", "p", "dim", "eps", "out"), {"p": 2.0, "dim": 1, "eps": 1e-12, "out": None}, args, kwargs)
    u = params["input"]
    if not (float_tensor(u) and u.requires_grad) or params["out"] is not None:
        return PLAIN if not needs_grad(u) else unsupported(tape, func)
    if params["p"] != 2:
        return unsupported(tape, func)
    refs = tape.site("normalize", (u,))
    if tape.phase == "record":
        return PLAIN
    u_r = refs[0]
    dim, eps = params["dim"], params["eps"]
    u_bar = (u.detach() + u_r) * 0.5
    n2 = Product.apply(u, u, u_bar, u_bar).sum(dim, keepdim=True)
    n2_r = (u_r * u_r).sum(dim, keepdim=True)
    g = lambda t: torch.reciprocal(torch.sqrt(t).clamp_min(eps))  # noqa: E731
    inv = Rescale.apply(n2, n2_r, g)
    return Product.apply(u, inv, u_bar, (inv.detach() + g(n2_r)) * 0.5)


def vector_norm_rule(names: tuple[str, ...], order_name: str, default_order: object,
                     linalg_norm: bool = False) -> Callable:
    """``torch.norm``, ``Tensor.norm``, ``torch.linalg.vector_norm`` and the vector forms of
    ``torch.linalg.norm`` (ConvNeXt-V2's GRN): ``(sum |u|^p)^(1/p)`` over ``dim`` for a finite
    ``p > 0``, as ``|u|^p`` (the product ``u * u`` for p = 2) summed and the root by the rescale
    rule. ``p = inf``, matrix norms and a norm over every dimension (the batch too) are left to the
    unsupported path."""

    def rule(tape: Tape, func, args, kwargs):
        p = bind_args(names, {order_name: default_order}, args, kwargs)
        u = p.get("input")
        if not (float_tensor(u) and u.requires_grad):
            return PLAIN
        order, dim = p.get(order_name), p.get("dim")
        if order is None or order == "fro":
            order = 2
        dims = (dim,) if isinstance(dim, int) else tuple(dim) if isinstance(dim, (list, tuple)) else ()
        matrix = linalg_norm and p.get(order_name) is not None and len(dims) == 2  # a matrix norm
        if (not dims or matrix or p.get("out") is not None or p.get("dtype") is not None
                or isinstance(order, (str, bool)) or not 0 < float(order) < math.inf):
            return unsupported(tape, func)
        refs = tape.site("vector_norm", (u,))
        if tape.phase == "record":
            return PLAIN
        u_r = refs[0]
        order = float(order)
        if order == 2:
            u_bar = (u.detach() + u_r) * 0.5
            s, s_r = Product.apply(u, u, u_bar, u_bar), u_r * u_r
            root = torch.sqrt
        else:
            power = lambda t: t.abs().pow(order)  # noqa: E731
            s, s_r = Rescale.apply(u, u_r, power), power(u_r)
            root = lambda t: t.pow(1.0 / order)  # noqa: E731
        s, s_r = s.sum(dims, keepdim=True), s_r.sum(dims, keepdim=True)
        n = Rescale.apply(s, s_r, root)
        return n if p.get("keepdim") else n.squeeze(dims)

    return rule


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm_rule(tape: Tape, func, args, kwargs):
    """Batch norm with running statistics is affine; written out as a per-channel scale and shift,
    whose gradient is the exact one. (Not torch's kernel: in torch 2.14 its CPU backward is wrong for a
    batch of one row when the incoming gradient is strided, e.g. after ``flatten(2).transpose(1, 2)``
    and a strided slice, as in LeViT and XCiT; the values then depended on ``batch_size``.)"""
    p = bind_args(_BATCH_NORM_ARGS, {"weight": None, "bias": None, "training": False, "momentum": 0.1,
                                     "eps": 1e-5}, args, kwargs)
    u, mean, var, weight, bias = (p[k] for k in ("input", "running_mean", "running_var", "weight", "bias"))
    if not (float_tensor(u) and u.requires_grad):
        return PLAIN
    if p["training"] or mean is None or var is None:
        return unsupported(tape, func)  # the batch's own statistics: nonlinear, and rows interact
    if needs_grad((mean, var, weight, bias)):
        return unsupported(tape, func)
    scale = torch.rsqrt(var + p["eps"])
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = [1, -1] + [1] * (u.dim() - 2)
    return u * scale.reshape(shape).to(u.dtype) + shift.reshape(shape).to(u.dtype)
