"""The local DeepLIFT rules as autograd Functions: forward gives the plain value, backward the multiplier.

Every rule module builds on these; so do rules elsewhere that need the same multipliers with
explicit reference values (e.g. the explained output head: a probability, a log-sum-exp).
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def secant(g: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, u_r: torch.Tensor,
            y: torch.Tensor | None = None, y_r: torch.Tensor | None = None) -> torch.Tensor:
    """Rescale multiplier ``(g(u) - g(u_r)) / (u - u_r)``.

    Where ``|u - u_r| <= sqrt(eps) * (|u| + |u_r|)`` the quotient is all rounding noise; there the
    slope of ``g`` over ``mid +- h`` (``h`` that same tolerance) stands in for it. That changes the
    node's share by at most ``2 * Lipschitz(g) * |u - u_r|``, i.e. rounding level, and needs neither a
    device sync nor autograd.
    """
    y = g(u) if y is None else y
    y_r = g(u_r) if y_r is None else y_r
    du = u - u_r
    root_eps = torch.finfo(du.dtype).eps ** 0.5
    tol = root_eps * (u.abs() + u_r.abs())
    small = du.abs() <= tol
    h = tol.clamp_min(root_eps * 1e-3)
    mid = (u + u_r) * 0.5
    slope = (g(mid + h) - g(mid - h)) / (2 * h)
    m = torch.where(small, slope, (y - y_r) / torch.where(small, torch.ones_like(du), du))
    # u == u_r == -inf (a masked attention score) gives nan: no difference to pass on, so 0
    return m.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


class Rescale(torch.autograd.Function):
    """y = g(u) elementwise; backward multiplies by the rescale multiplier against ``u_r``."""

    @staticmethod
    def forward(ctx, u, u_r, g):  # noqa: D102
        y = g(u)
        if u.dtype in (torch.bfloat16, torch.float16):  # autocast: the multiplier in float32
            m = secant(g, u.float(), u_r.float())
        else:
            m = secant(g, u, u_r, y=y)
        ctx.save_for_backward(m)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (m,) = ctx.saved_tensors
        return grad * m, None, None


class Product(torch.autograd.Function):
    """y = a * b (broadcasting); backward: da gets mean(b), db gets mean(a) (means over image/ref)."""

    @staticmethod
    def forward(ctx, a, b, a_bar, b_bar):  # noqa: D102
        ctx.save_for_backward(a_bar, b_bar)
        ctx.shapes = (a.shape, b.shape)
        return a * b

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        a_bar, b_bar = ctx.saved_tensors
        a_shape, b_shape = ctx.shapes
        ga = (grad * b_bar).sum_to_size(a_shape) if ctx.needs_input_grad[0] else None
        gb = (grad * a_bar).sum_to_size(b_shape) if ctx.needs_input_grad[1] else None
        return ga, gb, None, None


class MaxPool(torch.autograd.Function):
    """Max pooling, shap's rule per window: the output difference ``dy`` goes to the image's winner when
    ``dy >= 0`` and to the reference's winner when ``dy < 0`` (accumulated over overlapping windows)."""

    @staticmethod
    def forward(ctx, u, u_r, pool):  # noqa: D102
        out, idx = pool(u)
        out_r, idx_r = pool(u_r)
        i_x, i_r = idx.flatten(2), idx_r.flatten(2)
        o_x, o_r = out.flatten(2), out_r.flatten(2)
        dy = o_x - o_r
        du_x = o_x - u_r.flatten(2).gather(2, i_x)  # du at the image's winner: du_x >= dy
        du_r = u.flatten(2).gather(2, i_r) - o_r  # du at the reference's winner: du_r <= dy
        zero = torch.zeros_like(dy)
        # multipliers in [0, 1]: dy / du at the winner that takes the difference, 0 at the other
        w_x = torch.where((dy >= 0) & (du_x != 0), dy / torch.where(du_x != 0, du_x, 1.0), zero)
        w_r = torch.where((dy < 0) & (du_r != 0), dy / torch.where(du_r != 0, du_r, 1.0), zero)
        ctx.save_for_backward(i_x, i_r, w_x, w_r)
        ctx.in_shape = u.shape
        ctx.mark_non_differentiable(idx)
        return out, idx

    @staticmethod
    def backward(ctx, grad, _grad_idx):  # noqa: D102
        i_x, i_r, w_x, w_r = ctx.saved_tensors
        g = grad.flatten(2)
        shape = ctx.in_shape
        gin = torch.zeros((shape[0], shape[1], math.prod(shape[2:])), dtype=g.dtype, device=g.device)
        gin.scatter_add_(2, i_x, g * w_x)
        gin.scatter_add_(2, i_r, g * w_r)
        return gin.view(shape), None, None


class RowMax(torch.autograd.Function):
    """Maximum over ``dim`` (kept), max pooling's rule with the whole row as the window: the difference
    ``dc`` of the maxima goes to the image's winner when ``dc >= 0``, to the reference's when ``dc < 0``
    (multipliers in [0, 1])."""

    @staticmethod
    def forward(ctx, u, u_r, dim):  # noqa: D102
        c, i_x = u.max(dim, keepdim=True)
        c_r, i_r = u_r.max(dim, keepdim=True)
        dc = c - c_r
        du_x = c - u_r.gather(dim, i_x)  # >= dc
        du_r = u.gather(dim, i_r) - c_r  # <= dc
        zero = torch.zeros_like(dc)
        w_x = torch.where((dc >= 0) & (du_x != 0), dc / torch.where(du_x != 0, du_x, 1.0), zero)
        w_r = torch.where((dc < 0) & (du_r != 0), dc / torch.where(du_r != 0, du_r, 1.0), zero)
        ctx.save_for_backward(i_x, i_r, w_x, w_r)
        ctx.dim, ctx.in_shape = dim, u.shape
        return c

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        i_x, i_r, w_x, w_r = ctx.saved_tensors
        gin = torch.zeros(ctx.in_shape, dtype=grad.dtype, device=grad.device)
        gin.scatter_add_(ctx.dim, i_x, grad * w_x)
        gin.scatter_add_(ctx.dim, i_r, grad * w_r)
        return gin, None, None


def bilinear(h: Callable, a: torch.Tensor, b: torch.Tensor, a_bar: torch.Tensor,
              b_bar: torch.Tensor) -> torch.Tensor:
    """Value h(a, b); gradient h(., mean b) to ``a`` and h(mean a, .) to ``b`` (h bilinear)."""
    value = h(a.detach(), b.detach())
    if a.requires_grad:
        t = h(a, b_bar)
        value = value + (t - t.detach())
    if b.requires_grad:
        t = h(a_bar, b)
        value = value + (t - t.detach())
    return value
