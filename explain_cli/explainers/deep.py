"""DeepSHAP: the DeepLIFT rescale rule averaged over a background set, batched over images x references.

This computes the quantity of ``shap.DeepExplainer(model, background)`` (input target) or
``shap.DeepExplainer((model, layer), background)`` (layer target): for an image ``x``, an explained
class ``c`` and each background reference ``r_j`` (``j = 1..B``), DeepLIFT gives multipliers ``m_j``
with ``sum(m_j * (x - r_j)) = f_c(x) - f_c(r_j)``; the attribution is their mean::

    phi = mean_j  m_j * (x - r_j)        so  sum(phi) = f_c(x) - mean_j f_c(r_j)

At a layer, ``x - r_j`` is replaced by the difference of the layer's *input* (first positional
argument of its ``forward``) at the image and at the reference; the base value stays the mean model
output over the background. A token input ``(N, tokens, C)`` is attributed per token and channel and
put on the patch grid at the end (``_utils.layer_map``; the prefix tokens' share stays in ``shap_sum``).

How the multipliers are obtained ("modified gradients"). The model runs unchanged; while it runs, a
``TorchFunctionMode`` intercepts every torch call, so module calls (``nn.ReLU``), functional calls
(``F.relu``, ``torch.sigmoid``, ``x.sigmoid()``) and in-place variants (``relu_``,
``nn.ReLU(inplace=True)``, ``x *= s``) are all seen, however often a module is reused. Every
nonlinear call gets a custom backward whose local multiplier reproduces the *difference* of its
output between image and reference exactly:

* elementwise functions ``y = g(u)`` (relu, relu6/hardtanh, leaky_relu, elu, gelu, silu, sigmoid,
  tanh, hardswish, hardsigmoid, mish, softplus, exp, log, sqrt, rsqrt, reciprocal, pow with a
  constant exponent, clamp, abs, ...): rescale rule ``m = (g(u_x) - g(u_r)) / (u_x - u_r)``; where
  ``|u_x - u_r| <= sqrt(eps_dtype) * (|u_x| + |u_r|)`` (the quotient would be rounding noise), the
  slope of ``g`` over a window of that width around the midpoint;
* products of two input-dependent tensors (squeeze-excitation ``x * sigmoid(s)``, ``x * x``):
  ``d(ab) = mean(a) * db + mean(b) * da`` with ``mean(a) = (a_x + a_r) / 2`` (exact, and the Shapley
  value of the two factors); the same rule for ``matmul``/``bmm``/``mm`` (any bilinear map);
* division by an input-dependent tensor: ``a / b = a * (1 / b)``, the reciprocal by the rescale rule;
* max pooling (``max_pool1d/2d/3d``, ``adaptive_max_pool1d/2d/3d``): shap's rule, per window: the
  output difference ``dy`` goes to the image's winner ``i`` when ``dy >= 0`` (multiplier
  ``dy / du[i]``, in [0, 1] since ``du[i] >= dy``) and to the reference's winner ``k`` when ``dy < 0``
  (``dy / du[k]``, ``du[k] <= dy``); summed over windows, so overlapping windows (the ResNet stem)
  stay exact where shap's unpooling drops all but one window;
* maxima over a dimension (``amax``/``amin``, ``max``/``min`` with ``dim``) and elementwise
  ``maximum``/``minimum`` (the max of a stacked pair): the same rule with the whole row as the window;
* decomposed into the rules above, so exact as well: softmax / log_softmax (each row shifted by its
  own maximum, so no factor over- or underflows), scaled_dot_product_attention and torch's
  multi_head_attention_forward (masks, causal, scale, key padding, bias_k/v, zero attention, separate
  projections; two bilinear products around the softmax), layer_norm, group_norm, instance_norm,
  rms_norm, ``F.normalize``, ``baddbmm``/``addmm``/``addcmul`` of two input-dependent factors, and
  ``linear``/``conv`` with an input-dependent weight (CondConv's per-image kernels: bilinear);
* everything else that is linear (conv, linear, eval-mode batch norm, add, cat, views, average and
  adaptive-average pooling, eval-mode dropout, interpolate, ...) keeps its plain gradient, which is
  exact. Tensors that do not depend on the input (weights: BiT's weight standardisation computes a
  batch norm over its weights, rotary-embedding tables, attention biases) are constants.

Each rule is exact, so the attributions are additive up to floating-point rounding. An operation that
is neither linear nor covered (``torch.where``, ``sort``/``topk``, ``prod``, train-mode batch norm or
dropout, a product of three input-dependent einsum operands, ...) keeps its plain gradient and the
explainer logs a warning naming it once, whatever the call returns (a tensor, a tuple): the
``additivity_error`` column then shows the cost. Integer results that depend on the input (an argmax
used to index) are taken as the image's: such indexing is not covered by any rule and not reported.

The reference side is computed once per run: the background goes through the model once (in chunks
of ``batch_size``), recording the input of every nonlinear call, the layer input (layer target) and
the model outputs (base values). An explained chunk then holds ``batch_size`` (image, reference) rows;
each intercepted call looks up its recorded reference values by call order. The batch need not be the
first dimension of a call's tensors: the first reference goes through alone before the chunks, and
comparing shapes finds, per call, the dimension that holds the batch (Swin folds it into its windows,
``B * windows``; torch's multi-head attention runs sequence-first). This needs the model to make the
same sequence of nonlinear calls for every batch (true of feed-forward classifiers; otherwise the
explainer raises). Memory: the recorded inputs of the nonlinear calls of all
references stay on the device for the run (about the forward activations of ``B`` images; cap ``B``
with ``max_background``).

Attributions at a layer add up to ``f(x) - E f(r)`` when every path from the input to the output
runs through that layer's input (e.g. a stage of a sequential model); a layer inside a residual
block is bypassed by the skip connection, so the sum then misses the skip path's share.

The model must be an eager ``nn.Module``: TorchScript runs outside Python, where no call can be
intercepted (a TorchScript model is refused; scripted submodules are reported). While the explainer
runs, TF32 is switched off (cuDNN uses it for float32 convolutions by default on recent GPUs; it
would raise the float32 additivity error from ~1e-6 to ~1e-3 of the output differences).

DeepSHAP is deterministic: the per-image ``seeds`` are not used. The sums over the first and the
second half of the background are kept apart, for ``stability`` (``metrics.split_half_stability``):
how much the map would change with another background of the same size.
"""

from __future__ import annotations

import inspect
import logging
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch.overrides import TorchFunctionMode

from explain_cli import metrics
from explain_cli.errors import ConfigError
from explain_cli.explainers import _precision, _utils
from explain_cli.explainers import base
from explain_cli.explainers.base import Attribution, ExplainerSettings

log = logging.getLogger("explain_cli")


class Settings(ExplainerSettings):
    """``explainer.*`` keys of the deep (DeepSHAP / DeepLIFT rescale) explainer."""

    name: Literal["deep"] = "deep"
    max_background: int | None = Field(
        None, ge=1, le=10_000, description="Use at most this many background images as references (default: all).")


# ----------------------------------------------------------------------------------------------
# The local rules, as autograd Functions (forward: the plain value; backward: the DeepLIFT multiplier)
# ----------------------------------------------------------------------------------------------


def _secant(g: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor, u_r: torch.Tensor,
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


class _Rescale(torch.autograd.Function):
    """y = g(u) elementwise; backward multiplies by the rescale multiplier against ``u_r``."""

    @staticmethod
    def forward(ctx, u, u_r, g):  # noqa: D102
        y = g(u)
        if u.dtype in (torch.bfloat16, torch.float16):  # autocast: the multiplier in float32
            m = _secant(g, u.float(), u_r.float())
        else:
            m = _secant(g, u, u_r, y=y)
        ctx.save_for_backward(m)
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (m,) = ctx.saved_tensors
        return grad * m, None, None


class _Product(torch.autograd.Function):
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


class _MaxPool(torch.autograd.Function):
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


class _RowMax(torch.autograd.Function):
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


def _bilinear(h: Callable, a: torch.Tensor, b: torch.Tensor, a_bar: torch.Tensor,
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


# ----------------------------------------------------------------------------------------------
# The tape: records the reference side once, then serves it to the explained chunks by call order
# ----------------------------------------------------------------------------------------------


class _ModelMismatch(RuntimeError):
    pass


class _Slot:
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
            raise _ModelMismatch(f"a nonlinear call has shape {tuple(shape)} for {rows} rows and "
                                 f"{tuple(self.shape1)} for one: no dimension holds the batch")
        self.dim = differ[0]

    def _dim(self) -> int:
        return 0 if self.dim is None else self.dim

    def check(self, shape: torch.Size, rows: int) -> None:
        d = self._dim()
        expected = list(self.shape1)
        expected[d] *= rows
        if list(shape) != expected:
            raise _ModelMismatch(f"a nonlinear call has shape {tuple(shape)} here and {tuple(expected)} "
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


class _Tape:
    """Per-call reference values: ``record`` stores them (background), ``explain`` looks them up."""

    def __init__(self) -> None:
        self.phase = "off"
        self.position = 0
        self.calls: list[tuple[str, list[_Slot | None]]] = []
        self.rows = 0
        self.probing = False
        self.first = True
        self.ref_index: torch.Tensor | None = None
        self.unsupported: dict[str, int] = {}

    # phases -------------------------------------------------------------------------------
    def start_record(self, rows: int, first: bool, probe: bool = False) -> None:
        """A background chunk of ``rows`` references; ``probe``: the first reference alone, run before
        the chunks only to locate the batch in every call (see :class:`_Slot`)."""
        self.phase, self.position, self.rows, self.first, self.probing = "record", 0, rows, first, probe

    def start_explain(self, ref_index: torch.Tensor) -> None:
        self.phase, self.position, self.ref_index = "explain", 0, ref_index
        self.rows = int(ref_index.shape[0])

    def stop(self) -> None:
        self.phase = "off"
        if self.position != len(self.calls):
            raise _ModelMismatch(f"the model made {self.position} nonlinear calls on this batch but "
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
            if t == len(self.calls):
                if not self.first:
                    raise _ModelMismatch("the model made more nonlinear calls on this background chunk than "
                                         "on the first one")
                self.calls.append((kind, [None if x is None else _Slot(x.shape) for x in tensors]))
            rec_kind, slots = self.calls[t]
            if rec_kind != kind or [s is None for s in slots] != [x is None for x in tensors]:
                raise _ModelMismatch(f"nonlinear call {t} is a {kind} here and a {rec_kind} before")
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
            return None
        if t >= len(self.calls):
            raise _ModelMismatch(f"the model made more nonlinear calls on the images than on the background "
                                 f"({len(self.calls)})")
        rec_kind, slots = self.calls[t]
        if rec_kind != kind:
            raise _ModelMismatch(f"nonlinear call {t} is a {kind} here and a {rec_kind} on the background")
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


_PLAIN = object()  # a rule's answer: "run the call unchanged"


def _unsupported(tape: "_Tape", func: Any) -> object:
    """A nonlinear call on input-dependent tensors that no rule covers: plain gradient, reported."""
    if tape.phase == "explain":
        tape.note_unsupported(_call_name(func))
    return _PLAIN


def _needs_grad(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return any(_needs_grad(o) for o in obj)
    return False


def _dependent_count(obj: Any) -> int:
    """How many input-dependent tensors ``obj`` holds (one: the call is linear in it)."""
    if isinstance(obj, torch.Tensor):
        return int(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return sum(_dependent_count(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_dependent_count(o) for o in obj.values())
    return 0


def _float_grad_output(obj: Any) -> bool:
    """A floating-point tensor that depends on the input, alone or inside a tuple/list/dict result."""
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad and obj.is_floating_point()
    if isinstance(obj, (list, tuple)):
        return any(_float_grad_output(o) for o in obj)
    if isinstance(obj, dict):
        return any(_float_grad_output(o) for o in obj.values())
    return False


def _float_tensor(obj: Any) -> bool:
    return isinstance(obj, torch.Tensor) and obj.is_floating_point()


# ----------------------------------------------------------------------------------------------
# Rules: rule(tape, func, args, kwargs) -> result or _PLAIN
# ----------------------------------------------------------------------------------------------


def _apply_unary(tape: _Tape, u: torch.Tensor, g: Callable, inplace: bool):
    refs = tape.site("unary", (u,))
    if tape.phase == "record":
        return g(u) if (inplace and u.is_leaf) else _PLAIN
    y = _Rescale.apply(u, refs[0], g)
    if inplace and not u.is_leaf:
        u.copy_(y)
        return u
    return y


def _unary_rule(oop: Callable, inplace: bool | None) -> Callable:
    """Elementwise ``oop(u, *rest)``. ``inplace=None``: Python function with an ``inplace`` parameter."""
    signature = inspect.signature(oop) if inplace is None else None

    def rule(tape: _Tape, func, args, kwargs):
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            params = dict(bound.arguments)
            first = next(iter(signature.parameters))
            u = params.pop(first)
            is_inplace = bool(params.pop("inplace", False))
            if any(_needs_grad(v) for v in params.values()):
                return _unsupported(tape, func)
            g = lambda t: oop(t, **params)  # noqa: E731
        else:
            u, rest = args[0], args[1:]
            is_inplace = bool(inplace)
            if _needs_grad(rest) or any(_needs_grad(v) for v in kwargs.values()):
                return _unsupported(tape, func)
            g = lambda t: oop(t, *rest, **kwargs)  # noqa: E731
        if not _float_tensor(u) or not u.requires_grad:
            return _PLAIN
        return _apply_unary(tape, u, g, is_inplace)

    return rule


def _pow_rule(oop: Callable, inplace: bool, reflected: bool = False) -> Callable:
    def rule(tape: _Tape, func, args, kwargs):
        if kwargs or len(args) != 2:
            return _unsupported(tape, func) if _needs_grad((args, tuple(kwargs.values()))) else _PLAIN
        base_, exp_ = (args[1], args[0]) if reflected else args
        if _needs_grad(base_) and not _needs_grad(exp_) and _float_tensor(base_):
            return _apply_unary(tape, base_, lambda t: oop(t, exp_) if not reflected else oop(exp_, t), inplace)
        if _needs_grad(exp_) and not _needs_grad(base_) and _float_tensor(exp_):
            g = (lambda t: torch.pow(base_, t))
            return _apply_unary(tape, exp_, g, False)
        return _unsupported(tape, func) if _needs_grad(args) else _PLAIN

    return rule


def _mul_rule(inplace: bool) -> Callable:
    def rule(tape: _Tape, func, args, kwargs):
        if len(args) != 2 or kwargs:
            return _unsupported(tape, func) if _dependent_count((args, kwargs)) > 1 else _PLAIN
        a, b = args
        if not (_float_tensor(a) and _float_tensor(b) and a.requires_grad and b.requires_grad):
            return _PLAIN
        refs = tape.site("product", (a, b))
        if tape.phase == "record":
            return (a * b) if (inplace and a.is_leaf) else _PLAIN
        a_r, b_r = refs
        y = _Product.apply(a, b, (a.detach() + a_r) * 0.5, (b.detach() + b_r) * 0.5)
        if inplace and not a.is_leaf:
            a.copy_(y)
            return a
        return y

    return rule


def _div_rule(inplace: bool, reflected: bool = False) -> Callable:
    def rule(tape: _Tape, func, args, kwargs):
        if len(args) != 2 or (kwargs and kwargs.get("rounding_mode") is not None):
            return _unsupported(tape, func) if _needs_grad(args) else _PLAIN
        a, b = (args[1], args[0]) if reflected else args
        if not (_float_tensor(b) and b.requires_grad):
            return _PLAIN  # dividing by a constant is linear (a scalar / tensor is a unary rule)
        if _needs_grad(a) and not _float_tensor(a):
            return _PLAIN
        a_dep = isinstance(a, torch.Tensor) and a.requires_grad
        refs = tape.site("divide", (a if a_dep else None, b))
        if tape.phase == "record":
            return (a / b) if (inplace and a.is_leaf) else _PLAIN
        a_r, b_r = refs
        inv_r = torch.reciprocal(b_r)
        inv = _Rescale.apply(b, b_r, torch.reciprocal)
        if a_dep:
            y = _Product.apply(a, inv, (a.detach() + a_r) * 0.5, (inv.detach() + inv_r) * 0.5)
        else:
            y = a * inv
        if inplace and a_dep and not a.is_leaf:
            a.copy_(y)
            return a
        return y

    return rule


def _bilinear_rule(h_of: Callable[[tuple, dict], tuple[Callable, torch.Tensor, torch.Tensor] | None]) -> Callable:
    def rule(tape: _Tape, func, args, kwargs):
        parts = h_of(args, kwargs)
        if parts is None:  # a form without a rule (more operands, out=): fine while linear
            return _unsupported(tape, func) if _dependent_count((args, kwargs)) > 1 else _PLAIN
        h, a, b = parts
        if not (_float_tensor(a) and _float_tensor(b) and a.requires_grad and b.requires_grad):
            return _PLAIN
        refs = tape.site("bilinear", (a, b))
        if tape.phase == "record":
            return _PLAIN
        a_r, b_r = refs
        return _bilinear(h, a, b, (a.detach() + a_r) * 0.5, (b.detach() + b_r) * 0.5)

    return rule


def _matmul_parts(fn: Callable):
    def parts(args, kwargs):
        if len(args) != 2 or kwargs:
            return None
        return fn, args[0], args[1]
    return parts


def _einsum_parts(args, kwargs):
    if kwargs or len(args) < 2 or not isinstance(args[0], str):
        return None
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if len(operands) != 2:
        return None
    equation = args[0]
    return (lambda p, q: torch.einsum(equation, p, q)), operands[0], operands[1]


def _maxpool_rule(with_indices: Callable, n_args: int, ndim: int) -> Callable:
    """``with_indices`` is the ``*_with_indices`` twin (same leading positional parameters); ``ndim``
    the batched input's number of dimensions."""

    def rule(tape: _Tape, func, args, kwargs):
        u = args[0] if args else kwargs.get("input")
        if not (_float_tensor(u) and u.requires_grad):
            return _PLAIN
        kw = dict(kwargs)
        kw.pop("input", None)
        rest = list(args[1:])
        want_indices = bool(kw.pop("return_indices", False))
        if len(rest) >= n_args:  # return_indices given positionally
            want_indices = bool(rest[n_args - 1])
            rest = rest[:n_args - 1]
        if u.dim() != ndim:
            return _unsupported(tape, func)
        pool = lambda t: with_indices(t, *rest, **kw)  # noqa: E731
        refs = tape.site("maxpool", (u,))
        if tape.phase == "record":
            return _PLAIN
        out, idx = _MaxPool.apply(u, refs[0], pool)
        return (out, idx) if want_indices else out

    return rule


def _run(tape: _Tape, rule: Callable, func: Callable, args: tuple, kwargs: dict | None = None):
    """A rule inside a composite rule: its result, or the plain call where it answers ``_PLAIN``."""
    kwargs = kwargs or {}
    out = rule(tape, func, args, kwargs)
    return func(*args, **kwargs) if out is _PLAIN else out


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a builtin (no Python signature) by name."""
    params = dict(defaults)
    params.update(zip(names, args))
    params.update(kwargs)
    return params


def _softmax_core(tape: _Tape, u: torch.Tensor, dim: int, log_space: bool) -> torch.Tensor:
    """softmax / log_softmax over ``dim`` decomposed into exact rules.

    Each row is shifted by its own maximum (a max node with its own rule, :class:`_RowMax`), so
    ``exp`` sees values <= 0 and the row sum lies in [1, n] for the image and the reference alike:
    no factor overflows or underflows and no two large shares cancel. (One shift shared by image and
    reference would be exact as well, but where the two rows' log-sum-exps differ by ``D`` the reference
    row's sum underflows and the shares grow like ``exp(D)`` before they cancel: inf/nan, or 1e-2
    additivity errors, on LeViT's attention with trained batch-norm statistics.)
    """
    refs = tape.site("softmax", (u,))
    if tape.phase == "record":
        return torch.log_softmax(u, dim) if log_space else torch.softmax(u, dim)
    u_r = refs[0]
    v = u - _RowMax.apply(u, u_r, dim)
    v_r = u_r - u_r.amax(dim, keepdim=True)
    e_r = torch.exp(v_r)
    s_r = e_r.sum(dim, keepdim=True)
    e = _Rescale.apply(v, v_r, torch.exp)
    s = e.sum(dim, keepdim=True)
    if log_space:
        return v - _Rescale.apply(s, s_r, torch.log)
    inv = _Rescale.apply(s, s_r, torch.reciprocal)
    inv_r = torch.reciprocal(s_r)
    return _Product.apply(e, inv, (e.detach() + e_r) * 0.5, (inv.detach() + inv_r) * 0.5)


def _softmax_rule(log_space: bool, python_f: bool) -> Callable:
    """softmax / log_softmax; ``python_f``: F.softmax(input, dim, _stacklevel, dtype), else
    torch.softmax(input, dim, dtype)."""

    def rule(tape: _Tape, func, args, kwargs):
        u = args[0] if args else kwargs.get("input")
        if not (_float_tensor(u) and u.requires_grad):
            return _PLAIN
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        dtype_pos = 3 if python_f else 2
        dtype = args[dtype_pos] if len(args) > dtype_pos else kwargs.get("dtype")
        if dim is None:
            return _unsupported(tape, func)
        if dtype is not None:
            u = u.to(dtype)
        return _softmax_core(tape, u, dim, log_space)

    return rule


def _normalized(u: torch.Tensor, u_r: torch.Tensor, dims: tuple[int, ...], eps: float,
                center: bool = True) -> torch.Tensor:
    """``(u - mean) / sqrt(mean((u - mean)^2) + eps)`` over ``dims`` (``center=False``: RMS norm),
    as a product of two input-dependent factors, the square by the product rule and the inverse
    square root by the rescale rule."""
    d = u - u.mean(dims, keepdim=True) if center else u
    d_r = u_r - u_r.mean(dims, keepdim=True) if center else u_r
    d_bar = (d.detach() + d_r) * 0.5
    var = _Product.apply(d, d, d_bar, d_bar).mean(dims, keepdim=True) + eps
    var_r = (d_r * d_r).mean(dims, keepdim=True) + eps
    inv = _Rescale.apply(var, var_r, torch.rsqrt)
    inv_r = torch.rsqrt(var_r)
    return _Product.apply(d, inv, d_bar, (inv.detach() + inv_r) * 0.5)


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


def _norm_input(tape: _Tape, func, params: dict) -> tuple[torch.Tensor, torch.Tensor] | object | None:
    """The input of a normalisation and its reference, ``_PLAIN`` (nothing to do, or record) or
    ``_unsupported`` (input-dependent weights)."""
    u = params["input"]
    if not (_float_tensor(u) and u.requires_grad):
        return _PLAIN
    if any(_needs_grad(params.get(k)) for k in ("weight", "bias")):
        return _unsupported(tape, func)
    refs = tape.site("norm", (u,))
    if tape.phase == "record":
        return _PLAIN
    return u, refs[0]


def _trailing_dims(normalized_shape) -> tuple[int, ...]:
    """The dims layer_norm/rms_norm normalise over: the last len(normalized_shape) ones."""
    return tuple(range(-(1 if isinstance(normalized_shape, int) else len(normalized_shape)), 0))


def _layer_norm_rule(tape: _Tape, func, args, kwargs):
    params = _bind(_LAYER_NORM_ARGS, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    got = _norm_input(tape, func, params)
    if got is _PLAIN:
        return got
    u, u_r = got
    return _affine(_normalized(u, u_r, _trailing_dims(params["normalized_shape"]), params["eps"]),
                   params["weight"], params["bias"])


def _rms_norm_rule(tape: _Tape, func, args, kwargs):
    params = _bind(_RMS_NORM_ARGS, {"weight": None, "eps": None}, args, kwargs)
    got = _norm_input(tape, func, params)
    if got is _PLAIN:
        return got
    u, u_r = got
    eps = params["eps"] if params["eps"] is not None else torch.finfo(u.dtype).eps
    return _affine(_normalized(u, u_r, _trailing_dims(params["normalized_shape"]), eps, center=False),
                   params["weight"], None)


def _group_norm_rule(tape: _Tape, func, args, kwargs):
    """Layer norm over each group of channels (and all positions), then the per-channel affine map."""
    params = _bind(_GROUP_NORM_ARGS, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    got = _norm_input(tape, func, params)
    if got is _PLAIN:
        return got
    u, u_r = got
    shape = (u.shape[0], params["num_groups"], -1)
    out = _normalized(u.reshape(shape), u_r.reshape(shape), (-1,), params["eps"]).reshape(u.shape)
    return _affine(out, params["weight"], params["bias"], channel_dim=1)


def _instance_norm_rule(tape: _Tape, func, args, kwargs):
    params = _bind(_INSTANCE_NORM_ARGS, {"running_mean": None, "running_var": None, "weight": None,
                                         "bias": None, "use_input_stats": True, "momentum": 0.1, "eps": 1e-5},
                   args, kwargs)
    if not params["use_input_stats"]:
        return _PLAIN  # running statistics: linear
    if params["running_mean"] is not None and _needs_grad(params["input"]):
        return _unsupported(tape, func)  # training mode (updates the statistics)
    got = _norm_input(tape, func, params)
    if got is _PLAIN:
        return got
    u, u_r = got
    dims = tuple(range(2, u.dim()))
    return _affine(_normalized(u, u_r, dims, params["eps"]), params["weight"], params["bias"], channel_dim=1)


def _normalize_rule(tape: _Tape, func, args, kwargs):
    """F.normalize, p = 2: ``u * (1 / max(sqrt(sum u^2), eps))``."""
    params = _bind(("input", "p", "dim", "eps", "out"), {"p": 2.0, "dim": 1, "eps": 1e-12, "out": None}, args, kwargs)
    u = params["input"]
    if not (_float_tensor(u) and u.requires_grad) or params["out"] is not None:
        return _PLAIN if not _needs_grad(u) else _unsupported(tape, func)
    if params["p"] != 2:
        return _unsupported(tape, func)
    refs = tape.site("normalize", (u,))
    if tape.phase == "record":
        return _PLAIN
    u_r = refs[0]
    dim, eps = params["dim"], params["eps"]
    u_bar = (u.detach() + u_r) * 0.5
    n2 = _Product.apply(u, u, u_bar, u_bar).sum(dim, keepdim=True)
    n2_r = (u_r * u_r).sum(dim, keepdim=True)
    g = lambda t: torch.reciprocal(torch.sqrt(t).clamp_min(eps))  # noqa: E731
    inv = _Rescale.apply(n2, n2_r, g)
    return _Product.apply(u, inv, u_bar, (inv.detach() + g(n2_r)) * 0.5)


_MATMUL = _bilinear_rule(_matmul_parts(torch.matmul))


def _attention(tape: _Tape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool, scale: float | None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v``: two bilinear products around the softmax rule."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = _run(tape, _MATMUL, torch.matmul, (q * scale, k.transpose(-2, -1)))
    if causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = _softmax_core(tape, scores, -1, False)
    return _run(tape, _MATMUL, torch.matmul, (weights, v))


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_rule(tape: _Tape, func, args, kwargs):
    """F.scaled_dot_product_attention (eval: dropout_p 0), masks, ``is_causal``, ``scale``, GQA."""
    p = _bind(_SDPA_ARGS, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                           "enable_gqa": False}, args, kwargs)
    q, k, v, mask = p["query"], p["key"], p["value"], p["attn_mask"]
    if not _needs_grad((q, k, v, mask)):
        return _PLAIN
    if p["dropout_p"] or (p["is_causal"] and mask is not None):
        return _unsupported(tape, func)  # random (training), or an error torch raises itself
    if p["enable_gqa"] and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
    return _attention(tape, q, k, v, mask, bool(p["is_causal"]), p["scale"])


def _mha_rule(tape: _Tape, func, args, kwargs):
    """F.multi_head_attention_forward (what nn.MultiheadAttention calls), torch's own steps with the
    attention core of :func:`_attention`; returns ``(output, weights or None)`` as torch does."""
    p = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if not _needs_grad((query, key, value, a["static_k"], a["static_v"])):
        return _PLAIN
    helpers = [getattr(F, n, None) for n in ("_mha_shape_check", "_canonical_mask", "_none_or_dtype",
                                             "_in_projection_packed", "_in_projection")]
    if a["is_causal"] and a["attn_mask"] is None:
        return _PLAIN  # torch raises its own error
    if (a["dropout_p"] and a["training"]) or None in helpers:
        return _unsupported(tape, func)  # random (training), or a torch without these helpers
    shape_check, canonical_mask, none_or_dtype, in_projection_packed, in_projection = helpers
    num_heads, attn_mask, kpm = a["num_heads"], a["attn_mask"], a["key_padding_mask"]
    is_batched = shape_check(query, key, value, kpm, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        kpm = kpm.unsqueeze(0) if kpm is not None else None
    tgt_len, bsz, embed_dim = query.shape
    head_dim = embed_dim // num_heads
    kpm = canonical_mask(mask=kpm, mask_name="key_padding_mask", other_type=none_or_dtype(attn_mask),
                         other_name="attn_mask", target_type=query.dtype)
    causal = bool(a["is_causal"])
    if causal and kpm is None and not a["need_weights"]:
        attn_mask = None
    else:
        attn_mask = canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                   target_type=query.dtype, check_other=False)
        causal = False  # the given mask is used (torch's weights path ignores the hint too)
    if not a["use_separate_proj_weight"]:
        q, k, v = in_projection_packed(query, key, value, a["in_proj_weight"], a["in_proj_bias"])
    else:
        bias = a["in_proj_bias"]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        q, k, v = in_projection(query, key, value, a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"],
                                b_q, b_k, b_v)
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if a["bias_k"] is not None and a["bias_v"] is not None:
        k = torch.cat([k, a["bias_k"].repeat(1, bsz, 1)])
        v = torch.cat([v, a["bias_v"].repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = (k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if a["static_k"] is None
         else a["static_k"])
    v = (v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if a["static_v"] is None
         else a["static_v"])
    if a["add_zero_attn"]:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    src_len = k.shape[1]
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    scale = float(head_dim) ** -0.5
    scores = _run(tape, _MATMUL, torch.matmul, (q * scale, k.transpose(-2, -1)))
    if causal:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = _softmax_core(tape, scores, -1, False)
    out = _run(tape, _MATMUL, torch.matmul, (weights, v))
    out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).view(tgt_len, bsz, -1)
    avg = None
    if a["need_weights"]:
        avg = weights.view(bsz, num_heads, tgt_len, src_len)
        avg = avg.mean(dim=1) if a["average_attn_weights"] else avg
    if not is_batched:
        out = out.squeeze(1)
        avg = avg.squeeze(0) if avg is not None else None
    return out, avg


def _max_rule(negate: bool, builtin: str) -> Callable:
    """``amax``/``amin`` (``builtin`` "amax") and ``max``/``min`` over a dim ("max", values and the
    image's indices) by the row-max rule; ``maximum``/``minimum`` ("maximum") as the max of a stacked
    pair. A max over everything (the batch too) is left to the unsupported path."""

    def rule(tape: _Tape, func, args, kwargs):
        if builtin == "maximum":
            p = _bind(("input", "other"), {}, args, kwargs)
            a, b = p.get("input"), p.get("other")
            if not (_needs_grad(a) or _needs_grad(b)) or "out" in kwargs:
                return _PLAIN if not _needs_grad((a, b)) else _unsupported(tape, func)
            if not (_float_tensor(a) and _float_tensor(b)):
                return _unsupported(tape, func)
            u = torch.stack(torch.broadcast_tensors(a, b))
            dim, keep, want_indices = 0, False, False
        else:
            p = _bind(("input", "dim", "keepdim"), {"dim": None, "keepdim": False}, args, kwargs)
            if isinstance(p["dim"], torch.Tensor):  # torch.max(a, b): the elementwise maximum
                return _max_rule(negate, "maximum")(tape, func, args, kwargs)
            u, dim, keep = p.get("input"), p["dim"], bool(p["keepdim"])
            if not (_float_tensor(u) and u.requires_grad):
                return _PLAIN
            if dim is None or "out" in kwargs or isinstance(dim, (list, tuple)) and len(dim) != 1:
                return _unsupported(tape, func)
            dim = dim[0] if isinstance(dim, (list, tuple)) else dim
            want_indices = builtin == "max"
        if negate:
            u = -u
        refs = tape.site("max", (u,))
        if tape.phase == "record":
            c, idx = u.max(dim, keepdim=True)
        else:
            c = _RowMax.apply(u, refs[0], dim)
            idx = u.detach().argmax(dim, keepdim=True) if want_indices else None
        c = -c if negate else c
        if not keep:
            c = c.squeeze(dim)
            idx = idx.squeeze(dim) if want_indices else None
        if want_indices:
            return (torch.return_types.max if not negate else torch.return_types.min)((c, idx))
        return c

    return rule


def _addmm_rule(product: Callable) -> Callable:
    """``baddbmm``/``addbmm``/``addmm``/``addmv``/``addr`` = ``beta * input + alpha * product(a, b)``."""

    def rule(tape: _Tape, func, args, kwargs):
        p = _bind(("input", "m1", "m2"), {"beta": 1, "alpha": 1}, args, kwargs)
        names = [n for n in p if n not in ("input", "beta", "alpha")]
        if len(names) != 2 or "out" in p:
            return _unsupported(tape, func) if _needs_grad(args) else _PLAIN
        a, b = p[names[0]], p[names[1]]
        if not (_needs_grad(a) and _needs_grad(b)):
            return _PLAIN  # linear in the one input-dependent factor
        out = _run(tape, _bilinear_rule(_matmul_parts(product)), product, (a, b))
        return p["beta"] * p["input"] + p["alpha"] * out if p["beta"] != 0 else p["alpha"] * out

    return rule


def _weighted_rule(fn: Callable, names: tuple[str, ...]) -> Callable:
    """``linear``/``conv*`` whose weight depends on the input too (dynamic kernels: CondConv's routed
    weights): bilinear in (input, weight), plus the bias; with a constant weight, linear."""

    def rule(tape: _Tape, func, args, kwargs):
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if not (isinstance(weight, torch.Tensor) and weight.requires_grad):
            return _PLAIN  # the usual case (a module's frozen weight): called often, so decided first
        p = _bind(names, {}, args, kwargs)
        u = p.get("input")
        if not _needs_grad(u):
            return _PLAIN
        rest = {k: v for k, v in p.items() if k not in ("input", "weight", "bias")}
        h = lambda x, w: fn(x, w, None, **rest)  # noqa: E731
        out = _run(tape, _bilinear_rule(lambda a, kw: (h, a[0], a[1])), h, (u, weight))
        bias = p.get("bias")
        if bias is None:
            return out
        return out + (bias if fn is F.linear else bias.reshape([1, -1] + [1] * (out.dim() - 2)))

    return rule


def _grid_sample_rule(tape: _Tape, func, args, kwargs):
    """Sampling at fixed positions is linear in the input; an input-dependent grid is not covered."""
    grid = args[1] if len(args) > 1 else kwargs.get("grid")
    return _unsupported(tape, func) if _needs_grad(grid) else _PLAIN


def _addcmul_rule(tape: _Tape, func, args, kwargs):
    """``input + value * t1 * t2``."""
    p = _bind(("input", "tensor1", "tensor2"), {"value": 1}, args, kwargs)
    t1, t2 = p.get("tensor1"), p.get("tensor2")
    if "out" in kwargs or t1 is None or t2 is None:
        return _unsupported(tape, func) if _needs_grad(args) else _PLAIN
    if not (_needs_grad(t1) and _needs_grad(t2)):
        return _PLAIN
    return p["input"] + p["value"] * _run(tape, _mul_rule(False), torch.mul, (t1, t2))


def _build_rules() -> dict[Any, Callable]:
    T = torch.Tensor
    rules: dict[Any, Callable] = {}

    def put(func, rule):
        if func is not None:
            rules[func] = rule

    # Python functionals with an ``inplace`` parameter (what nn.ReLU, nn.ReLU6, nn.Hardswish, ... call)
    for name in ("relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "mish", "elu", "selu",
                 "celu", "leaky_relu", "threshold"):
        fn = getattr(F, name, None)
        if fn is not None and "inplace" in inspect.signature(fn).parameters:
            put(fn, _unary_rule(fn, None))
    # out-of-place builtins / tensor methods: name -> (out-of-place function)
    unary_names = ("relu", "sigmoid", "tanh", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
                   "sqrt", "rsqrt", "reciprocal", "abs", "square", "erf", "erfc", "sin", "cos", "atan",
                   "asinh", "sinh", "cosh", "clamp", "clip", "clamp_min", "clamp_max", "sign", "logit",
                   "nan_to_num", "hardshrink", "softplus", "selu", "celu")
    for name in unary_names:
        for holder in (torch, T):
            fn = getattr(holder, name, None)
            if fn is not None:
                put(fn, _unary_rule(fn, False))
            fn_ = getattr(holder, name + "_", None)
            if fn is not None and fn_ is not None:
                put(fn_, _unary_rule(fn, True))
    nn_c = torch._C._nn
    for name in ("gelu", "softplus", "softshrink", "hardshrink", "log_sigmoid", "hardtanh", "leaky_relu",
                 "elu", "silu", "hardswish", "hardsigmoid", "mish", "relu6"):
        fn = getattr(nn_c, name, None)
        if fn is not None:
            put(fn, _unary_rule(fn, False))
            fn_ = getattr(nn_c, name + "_", None)
            if fn_ is not None:
                put(fn_, _unary_rule(fn, True))
    for name in ("logsigmoid", "softsign", "tanhshrink", "gelu", "softplus", "softshrink", "sigmoid", "tanh"):
        fn = getattr(F, name, None)
        if fn is not None and fn not in rules:
            put(fn, _unary_rule(fn, False))
    for name, oop in (("hardtanh_", F.hardtanh), ("elu_", F.elu), ("leaky_relu_", F.leaky_relu),
                      ("celu_", F.celu), ("selu_", F.selu), ("threshold_", F.threshold)):
        fn = getattr(F, name, None)
        if fn is not None and fn not in rules:
            put(fn, _inplace_twin(oop))
    # powers, scalar / tensor
    put(torch.pow, _pow_rule(torch.pow, False))
    put(T.pow, _pow_rule(torch.pow, False))
    put(T.pow_, _pow_rule(torch.pow, True))
    put(T.__pow__, _pow_rule(torch.pow, False))
    put(getattr(T, "__ipow__", None), _pow_rule(torch.pow, True))
    put(T.__rpow__, _pow_rule(torch.pow, False, reflected=True))
    put(getattr(T, "__rdiv__", None), _div_rule(False, reflected=True))
    put(getattr(T, "__rtruediv__", None), _div_rule(False, reflected=True))
    # products and quotients of two input-dependent tensors
    for fn in (torch.mul, T.mul, T.__mul__, T.__rmul__, torch.multiply, T.multiply):
        put(fn, _mul_rule(False))
    for fn in (T.mul_, T.__imul__, T.multiply_):
        put(fn, _mul_rule(True))
    for fn in (torch.div, T.div, T.__truediv__, torch.true_divide, T.true_divide, torch.divide, T.divide):
        put(fn, _div_rule(False))
    for fn in (T.div_, T.__itruediv__, T.true_divide_, T.divide_):
        put(fn, _div_rule(True))
    for fn in (torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm):
        put(fn, _bilinear_rule(_matmul_parts(torch.matmul if fn in (T.__matmul__,) else fn)))
    put(torch.einsum, _bilinear_rule(_einsum_parts))
    # max pooling
    put(F.max_pool1d, _maxpool_rule(F.max_pool1d_with_indices, 6, 3))
    put(F.max_pool2d, _maxpool_rule(F.max_pool2d_with_indices, 6, 4))
    put(F.max_pool3d, _maxpool_rule(F.max_pool3d_with_indices, 6, 5))
    put(torch.max_pool1d, _maxpool_rule(F.max_pool1d_with_indices, 6, 3))
    put(torch.max_pool2d, _maxpool_rule(F.max_pool2d_with_indices, 6, 4))
    put(torch.max_pool3d, _maxpool_rule(F.max_pool3d_with_indices, 6, 5))
    put(F.max_pool1d_with_indices, _maxpool_rule_indices(F.max_pool1d_with_indices, 3))
    put(F.max_pool2d_with_indices, _maxpool_rule_indices(F.max_pool2d_with_indices, 4))
    put(F.max_pool3d_with_indices, _maxpool_rule_indices(F.max_pool3d_with_indices, 5))
    put(F.adaptive_max_pool1d, _maxpool_rule(F.adaptive_max_pool1d_with_indices, 2, 3))
    put(F.adaptive_max_pool2d, _maxpool_rule(F.adaptive_max_pool2d_with_indices, 2, 4))
    put(F.adaptive_max_pool3d, _maxpool_rule(F.adaptive_max_pool3d_with_indices, 2, 5))
    # decomposed into exact rules
    put(F.softmax, _softmax_rule(False, True))
    put(F.log_softmax, _softmax_rule(True, True))
    for fn in (torch.softmax, T.softmax):
        put(fn, _softmax_rule(False, False))
    for fn in (torch.log_softmax, T.log_softmax):
        put(fn, _softmax_rule(True, False))
    # normalisations (the input's own statistics), attention, maxima
    for fn in (F.layer_norm, torch.layer_norm):
        put(fn, _layer_norm_rule)
    for fn in (F.group_norm, torch.group_norm):
        put(fn, _group_norm_rule)
    for fn in (F.instance_norm, torch.instance_norm):
        put(fn, _instance_norm_rule)
    for fn in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)):
        put(fn, _rms_norm_rule)
    put(F.normalize, _normalize_rule)
    put(F.scaled_dot_product_attention, _sdpa_rule)
    put(F.multi_head_attention_forward, _mha_rule)
    for negate, names in ((False, ("amax", "max", "maximum", "fmax")), (True, ("amin", "min", "minimum", "fmin"))):
        for holder in (torch, T):
            for name in names:
                kind = {"fmax": "maximum", "fmin": "maximum", "minimum": "maximum", "amin": "amax",
                        "min": "max"}.get(name, name)
                put(getattr(holder, name, None), _max_rule(negate, kind))
    for name, product in (("baddbmm", torch.bmm), ("addbmm", lambda a, b: torch.bmm(a, b).sum(0)),
                          ("addmm", torch.mm), ("addmv", torch.mv), ("addr", torch.outer)):
        for holder in (torch, T):
            put(getattr(holder, name, None), _addmm_rule(product))
    for fn in (torch.addcmul, T.addcmul):
        put(fn, _addcmul_rule)
    for fn in (F.grid_sample, torch.grid_sampler):
        put(fn, _grid_sample_rule)
    put(F.linear, _weighted_rule(F.linear, ("input", "weight", "bias")))
    for fn in (F.conv1d, F.conv2d, F.conv3d):
        put(fn, _weighted_rule(fn, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")))
    return rules


def _inplace_twin(oop: Callable) -> Callable:
    """Rule for ``F.<name>_`` (in place): the out-of-place Python functional with ``inplace=True``."""
    signature = inspect.signature(oop)

    def rule(tape: _Tape, func, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        params = dict(bound.arguments)
        params["inplace"] = True
        return _unary_rule(oop, None)(tape, oop, (), params)

    return rule


def _maxpool_rule_indices(with_indices: Callable, ndim: int) -> Callable:
    inner = _maxpool_rule(with_indices, 10**6, ndim)

    def rule(tape, func, args, kwargs):
        kw = dict(kwargs)
        kw.pop("return_indices", None)
        result = inner(tape, func, tuple(args[:6]) if len(args) > 6 else args, {**kw, "return_indices": True})
        return result

    return rule


# Operations that are linear in their input-dependent tensor arguments (plain gradients are exact)
# or produce no float output; anything else without a rule is reported once as unsupported.
_LINEAR_NAMES = frozenset("""
add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub subtract subtract_ neg neg_
__neg__ negative __pos__ positive sum mean nansum cat concat concatenate stack hstack vstack dstack
flatten unflatten view view_as reshape reshape_as permute transpose transpose_ t contiguous clone
squeeze squeeze_ unsqueeze unsqueeze_ expand expand_as repeat tile narrow select index_select gather
__getitem__ __setitem__ split split_with_sizes chunk unbind tensor_split pad conv1d conv2d conv3d
conv_transpose1d conv_transpose2d conv_transpose3d linear avg_pool1d avg_pool2d avg_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d interpolate upsample upsample_nearest
upsample_bilinear pixel_shuffle pixel_unshuffle channel_shuffle native_channel_shuffle roll flip fliplr
flipud rot90 to type float double half bfloat16 cpu cuda copy_ zero_ fill_ masked_fill masked_fill_
cumsum diff trace diagonal movedim moveaxis swapaxes swapdims unfold fold as_strided detach
requires_grad_ type_as new_zeros new_ones new_empty new_full zeros_like ones_like empty_like full_like
T mT H mH shape dtype device
mul mul_ __mul__ __rmul__ __imul__ multiply div div_ __truediv__ __itruediv__ true_divide divide
matmul __matmul__ mm bmm einsum dropout dropout1d dropout2d dropout3d alpha_dropout
feature_alpha_dropout identity real imag view_as_real flatten_ batch_norm
index_add index_copy scatter scatter_add expand_copy narrow_copy split_copy slice_copy permute_copy
view_copy transpose_copy select_copy unsqueeze_copy squeeze_copy __len__ dim size numel
""".split())


def _call_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a tensor property (x.T, x.mT): name the property
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _train_mode_call(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "batch_norm":
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        return bool(training)
    if name.startswith("dropout") or name.endswith("dropout"):
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        return bool(training) and p > 0
    return False


class _DeepMode(TorchFunctionMode):
    """Routes nonlinear torch calls to the DeepLIFT rules while the model runs."""

    def __init__(self, tape: _Tape, rules: dict[Any, Callable]) -> None:
        super().__init__()
        self.tape = tape
        self.rules = rules

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            rule = self.rules.get(func)
        except TypeError:  # unhashable callable
            rule = None
        if rule is not None:
            result = rule(self.tape, func, args, kwargs)
            if result is not _PLAIN:
                return result
        out = func(*args, **kwargs)
        if rule is None and self.tape.phase == "explain" and _float_grad_output(out):
            name = _call_name(func)
            if (name not in _LINEAR_NAMES or _train_mode_call(name, args, kwargs)) \
                    and _needs_grad((args, tuple(kwargs.values()))):
                self.tape.note_unsupported(name)
        return out


# ----------------------------------------------------------------------------------------------
# The explainer
# ----------------------------------------------------------------------------------------------


@contextmanager
def _full_float32() -> Iterator[None]:
    """TF32 off for the duration (cuDNN allows it for float32 convolutions by default on Ampere and
    later): with its 10-bit mantissa the float32 additivity error grows from ~1e-6 to ~1e-3."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


class Explainer(base.Explainer):
    """DeepSHAP (DeepLIFT rescale, averaged over the background) at the input or at a layer's input."""

    name = "deep"

    def __init__(self, context: base.ExplainContext) -> None:
        super().__init__(context)
        self._rules = _build_rules()
        self._tape: _Tape | None = None
        self._background_mean: torch.Tensor | None = None  # (outputs,) float64
        self._layer_reference: torch.Tensor | None = None  # (B, ...) layer input of the background
        self._warned: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------

    def references(self) -> torch.Tensor:
        settings: Settings = self.settings  # type: ignore[assignment]
        background = self.context.background
        if background.shape[0] < 1:
            raise ValueError("the background is empty")
        if settings.max_background is not None:
            background = background[: settings.max_background]
        return background

    def _layer_value(self, captured: _utils.LayerInput) -> torch.Tensor:
        return _utils.captured_feature_map(captured, self.context.layer_name, "deep")

    def _record(self) -> None:
        """One pass over the references: nonlinear-call inputs, layer input and model outputs."""
        ctx = self.context
        model, layer = ctx.model, ctx.layer
        if isinstance(_precision.unwrap(model), torch.jit.ScriptModule):
            raise ConfigError("explainer.name", "the deep explainer needs an eager PyTorch model: a "
                                                "TorchScript model runs outside Python, so its nonlinear "
                                                "operations cannot be given DeepLIFT rules; use the "
                                                "gradient explainer, or load the model from its code")
        scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
        if scripted:
            log.warning("deep: %s %s TorchScript: the DeepLIFT rules do not reach inside; the plain "
                        "gradient is used there (see the additivity_error column)",
                        ", ".join(scripted[:5]), "is" if len(scripted) == 1 else "are")
        refs = self.references()
        tape = _Tape()
        outputs, layer_parts = [], []
        size = max(1, int(ctx.batch_size))
        probe = refs.shape[0] > 1 and size > 1  # the first reference alone locates the batch in every call
        plan = ([(0, 1)] if probe else []) + list(_utils.chunk_ranges(refs.shape[0], size))
        for i, (a, b) in enumerate(plan):
            chunk = refs[a:b]
            tape.start_record(b - a, first=(i == 0), probe=probe and i == 0)
            with torch.enable_grad(), _DeepMode(tape, self._rules):
                if layer is None:
                    out = model(chunk.detach().clone().requires_grad_(True))
                else:
                    with _utils.capture_layer_input(layer, make_leaf=True) as captured:
                        out = model(chunk)
                    layer_value = self._layer_value(captured).detach().clone()
            self._check_stop(tape)
            if not (probe and i == 0):
                outputs.append(_utils.as_2d(out).detach().to(torch.float64))
                if layer is not None:
                    layer_parts.append(layer_value)
            del out
        tape.finish_record()
        self._background_mean = torch.cat(outputs).mean(0)
        self._layer_reference = torch.cat(layer_parts) if layer is not None else None
        self._tape = tape

    def _check_stop(self, tape: _Tape) -> None:
        try:
            tape.stop()
        except _ModelMismatch as exc:
            raise RuntimeError(f"deep: {exc}; DeepSHAP needs the same sequence of nonlinear calls for "
                               "every batch (a feed-forward model without data-dependent control flow)") from None

    def _ensure_record(self) -> None:
        if self._tape is None:
            self._record()

    def background_mean(self) -> torch.Tensor:
        """Mean model output over the references (float64), computed once per explainer."""
        with _utils.frozen_parameters(self.context.model), _full_float32():
            self._ensure_record()
        assert self._background_mean is not None
        return self._background_mean

    def _warn_unsupported(self, tape: _Tape) -> None:
        new = sorted(set(tape.unsupported) - self._warned)
        if new:
            self._warned.update(new)
            log.warning("deep: no DeepLIFT rule for %s; the plain gradient is used there, so the "
                        "attributions may not add up (see the additivity_error column)", ", ".join(new))

    # -- main ------------------------------------------------------------------------------

    def explain(self, images: torch.Tensor, top_k: int, seeds: Sequence[int]) -> Attribution:
        ctx = self.context
        model, layer = ctx.model, ctx.layer
        device = images.device
        n_images = images.shape[0]
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")

        with _utils.frozen_parameters(model), _full_float32():
            self._ensure_record()
            tape = self._tape
            assert tape is not None and self._background_mean is not None
            refs = self.references()
            n_refs = refs.shape[0]

            raw = _utils.forward_in_chunks(self.context.model, images, self.context.batch_size)
            classes, probabilities = _utils.rank_outputs(raw, top_k)
            k = classes.shape[1]
            outputs = raw.gather(1, classes).to(torch.float64)
            base_values = self._background_mean.to(device)[classes]
            classes_dev = classes.to(device)

            acc_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
            phi: torch.Tensor | None = None  # (k, N, *explained shape)
            scale = _precision.grad_scale(model)
            for start, stop in _utils.model_chunks(ctx, n_images * n_refs):
                rows = torch.arange(start, stop, device=device)
                img = torch.div(rows, n_refs, rounding_mode="floor")
                ref = rows - img * n_refs
                x = images[img]
                tape.start_explain(ref)
                with torch.enable_grad(), _DeepMode(tape, self._rules):
                    if layer is None:
                        target = x.detach().clone().requires_grad_(True)
                        out = _utils.as_2d(model(target))
                        delta = (x - refs[ref]).detach()
                    else:
                        with _utils.capture_layer_input(layer, make_leaf=True) as captured:
                            out = _utils.as_2d(model(x))
                        target = self._layer_value(captured)
                        assert self._layer_reference is not None
                        delta = target.detach().to(acc_dtype) - self._layer_reference[ref].to(acc_dtype)
                self._check_stop(tape)
                row_classes = classes_dev[img]
                rank_rows = torch.arange(stop - start, device=device)
                half = img * 2 + (ref >= n_refs // 2)  # the two halves of the background, summed apart
                for r in range(k):
                    selected = out[rank_rows, row_classes[:, r]].sum()
                    (grad,) = torch.autograd.grad(selected * scale, target, retain_graph=r + 1 < k,
                                                  allow_unused=True)
                    if grad is None:
                        grad = torch.zeros_like(target)
                    _precision.check_gradient(grad, scale)
                    contribution = (grad.to(acc_dtype) / scale) * delta.to(acc_dtype)
                    if phi is None:
                        phi = torch.zeros((k, 2 * n_images) + tuple(contribution.shape[1:]), dtype=acc_dtype,
                                          device=device)
                    phi[r].index_add_(0, half, contribution)
                del out, target, delta
            self._warn_unsupported(tape)

        assert phi is not None
        halves = phi.view((k, n_images, 2) + tuple(phi.shape[2:])).transpose(0, 1)  # (N, k, 2, *explained shape)
        values = (halves.sum(2) / n_refs).contiguous()  # (N, k, *explained shape)
        shap_sum = values.flatten(2).to(torch.float64).sum(2)  # token layer: prefix tokens included
        values = _utils.layer_map(values, model, ctx.layer_name)  # (N, k, C, H, W)
        stability = None
        if n_refs >= 2:
            half_maps = [_utils.layer_map(halves[:, :, h], model, ctx.layer_name) for h in (0, 1)]
            stability = metrics.split_half_stability(*half_maps, (n_refs // 2, n_refs - n_refs // 2))
        return Attribution(
            values=values.cpu().numpy().astype(np.float32, copy=False),
            classes=classes.cpu().numpy().astype(np.int64),
            probabilities=probabilities.float().cpu().numpy(),
            outputs=outputs.cpu().numpy(),
            base_values=base_values.cpu().numpy(),
            shap_sum=shap_sum.cpu().numpy(),
            stability=stability,
        )
