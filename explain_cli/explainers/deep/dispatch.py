"""Which torch call gets which rule (the rule table), the calls that need none (linear), and the
``TorchFunctionMode`` that routes every torch call of the running model through the table."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from explain_cli.errors import UserError
from explain_cli.explainers.deep.attention import mha_rule, sdpa_rule
from explain_cli.explainers.deep.calls import PLAIN, call_name, float_grad_output, needs_grad, unsupported
from explain_cli.explainers.deep.elementwise import inplace_twin, pow_rule, unary_rule
from explain_cli.explainers.deep.maxima import max_rule, maxpool_rule, maxpool_rule_indices
from explain_cli.explainers.deep.norms import batch_norm_rule, group_norm_rule, instance_norm_rule, \
    layer_norm_rule, normalize_rule, rms_norm_rule, vector_norm_rule
from explain_cli.explainers.deep.products import addcmul_rule, addmm_rule, bilinear_rule, div_rule, einsum_parts, \
    matmul_parts, mul_rule, weighted_rule
from explain_cli.explainers.deep.softmax import softmax_rule
from explain_cli.explainers.deep.tape import Tape


def grid_sample_rule(tape: Tape, func, args, kwargs):
    """Sampling at fixed positions is linear in the input; an input-dependent grid is not covered."""
    grid = args[1] if len(args) > 1 else kwargs.get("grid")
    return unsupported(tape, func) if needs_grad(grid) else PLAIN


#: The functions of torch's private module ``torch._C._nn`` the rules are keyed on (what F.gelu, F.silu,
#: F.hardtanh, ... are or call): each present in every torch this project supports. Others (``hardshrink``)
#: are taken when there.
PRIVATE_NN = ("gelu", "softplus", "softshrink", "log_sigmoid", "hardtanh", "leaky_relu", "elu", "silu",
              "hardswish", "hardsigmoid", "mish", "relu6")


def _supported_torch() -> str:
    """The torch requirement explain-cli was installed with ('torch<=2.14.1,>=2.2'), for messages."""
    from importlib import metadata

    try:
        return next(r for r in metadata.requires("explain-cli") or [] if r.split("<")[0].split(">")[0] == "torch")
    except (metadata.PackageNotFoundError, StopIteration):
        return "the torch range in pyproject.toml"


def private_nn() -> Any:
    """``torch._C._nn``, checked: a UserError naming the installed torch when the module is missing or
    lacks one of :data:`PRIVATE_NN` (a private API can change in any release; without its functions the
    rules of GELU, SiLU, ... would silently not apply)."""
    module = getattr(getattr(torch, "_C", None), "_nn", None)
    missing = [n for n in PRIVATE_NN if not callable(getattr(module, n, None))]
    if module is None or missing:
        what = "has no torch._C._nn" if module is None else f"has a torch._C._nn without {', '.join(missing)}"
        raise UserError(f"the deep explainer's rules use torch's private API torch._C._nn (the functions behind "
                        f"F.gelu, F.silu, ...; explain_cli/explainers/deep/dispatch.py), and the installed torch "
                        f"{torch.__version__} {what}: install a torch explain-cli supports ({_supported_torch()}), "
                        f"or use another explainer")
    return module


Put = Callable[[Any, Callable], None]


def build_rules() -> dict[Any, Callable]:
    """Every function or method with a rule -> the rule, family by family (a later family's ``put``
    replaces an earlier one's rule for the same function, as one long table would)."""
    rules: dict[Any, Callable] = {}

    def put(func, rule):
        if func is not None:
            rules[func] = rule

    _activation_rules(put, rules)
    _product_rules(put)
    _pooling_rules(put)
    _normalisation_rules(put)
    _reduction_rules(put)
    return rules


def _activation_rules(put: Put, rules: dict[Any, Callable]) -> None:
    """Elementwise functions: the functionals with ``inplace``, torch's and Tensor's, torch._C._nn's."""
    T = torch.Tensor
    # Python functionals with an ``inplace`` parameter (what nn.ReLU, nn.ReLU6, nn.Hardswish, ... call)
    for name in ("relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "silu", "mish", "elu", "selu",
                 "celu", "leaky_relu", "threshold"):
        fn = getattr(F, name, None)
        if fn is not None and "inplace" in inspect.signature(fn).parameters:
            put(fn, unary_rule(fn, None))
    # out-of-place builtins / tensor methods: name -> (out-of-place function)
    unary_names = ("relu", "sigmoid", "tanh", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p",
                   "sqrt", "rsqrt", "reciprocal", "abs", "square", "erf", "erfc", "sin", "cos", "atan",
                   "asinh", "sinh", "cosh", "clamp", "clip", "clamp_min", "clamp_max", "sign", "logit",
                   "nan_to_num", "hardshrink", "softplus", "selu", "celu")
    for name in unary_names:
        for holder in (torch, T):
            fn = getattr(holder, name, None)
            if fn is not None:
                put(fn, unary_rule(fn, False))
            fn_ = getattr(holder, name + "_", None)
            if fn is not None and fn_ is not None:
                put(fn_, unary_rule(fn, True))
    nn_c = private_nn()
    for name in ("gelu", "softplus", "softshrink", "hardshrink", "log_sigmoid", "hardtanh", "leaky_relu",
                 "elu", "silu", "hardswish", "hardsigmoid", "mish", "relu6"):
        fn = getattr(nn_c, name, None)
        if fn is not None:
            put(fn, unary_rule(fn, False))
            fn_ = getattr(nn_c, name + "_", None)
            if fn_ is not None:
                put(fn_, unary_rule(fn, True))
    for name in ("logsigmoid", "softsign", "tanhshrink", "gelu", "softplus", "softshrink", "sigmoid", "tanh"):
        fn = getattr(F, name, None)
        if fn is not None and fn not in rules:
            put(fn, unary_rule(fn, False))
    for name, oop in (("hardtanh_", F.hardtanh), ("elu_", F.elu), ("leaky_relu_", F.leaky_relu),
                      ("celu_", F.celu), ("selu_", F.selu), ("threshold_", F.threshold)):
        fn = getattr(F, name, None)
        if fn is not None and fn not in rules:
            put(fn, inplace_twin(oop))


def _product_rules(put: Put) -> None:
    """Powers, products and quotients of two input-dependent tensors, matmul and einsum."""
    T = torch.Tensor
    # powers, scalar / tensor
    put(torch.pow, pow_rule(torch.pow, False))
    put(T.pow, pow_rule(torch.pow, False))
    put(T.pow_, pow_rule(torch.pow, True))
    put(T.__pow__, pow_rule(torch.pow, False))
    put(getattr(T, "__ipow__", None), pow_rule(torch.pow, True))
    put(T.__rpow__, pow_rule(torch.pow, False, reflected=True))
    put(getattr(T, "__rdiv__", None), div_rule(False, reflected=True))
    put(getattr(T, "__rtruediv__", None), div_rule(False, reflected=True))
    # products and quotients of two input-dependent tensors
    for fn in (torch.mul, T.mul, T.__mul__, T.__rmul__, torch.multiply, T.multiply):
        put(fn, mul_rule(False))
    for fn in (T.mul_, T.__imul__, T.multiply_):
        put(fn, mul_rule(True))
    for fn in (torch.div, T.div, T.__truediv__, torch.true_divide, T.true_divide, torch.divide, T.divide):
        put(fn, div_rule(False))
    for fn in (T.div_, T.__itruediv__, T.true_divide_, T.divide_):
        put(fn, div_rule(True))
    for fn in (torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm):
        put(fn, bilinear_rule(matmul_parts(torch.matmul if fn in (T.__matmul__,) else fn)))
    put(torch.einsum, bilinear_rule(einsum_parts))


def _pooling_rules(put: Put) -> None:
    """Max pooling (with and without indices, adaptive), and softmax decomposed into exact rules."""
    T = torch.Tensor
    put(F.max_pool1d, maxpool_rule(F.max_pool1d_with_indices, 6, 3))
    put(F.max_pool2d, maxpool_rule(F.max_pool2d_with_indices, 6, 4))
    put(F.max_pool3d, maxpool_rule(F.max_pool3d_with_indices, 6, 5))
    put(torch.max_pool1d, maxpool_rule(F.max_pool1d_with_indices, 6, 3))
    put(torch.max_pool2d, maxpool_rule(F.max_pool2d_with_indices, 6, 4))
    put(torch.max_pool3d, maxpool_rule(F.max_pool3d_with_indices, 6, 5))
    put(F.max_pool1d_with_indices, maxpool_rule_indices(F.max_pool1d_with_indices, 3))
    put(F.max_pool2d_with_indices, maxpool_rule_indices(F.max_pool2d_with_indices, 4))
    put(F.max_pool3d_with_indices, maxpool_rule_indices(F.max_pool3d_with_indices, 5))
    put(F.adaptive_max_pool1d, maxpool_rule(F.adaptive_max_pool1d_with_indices, 2, 3))
    put(F.adaptive_max_pool2d, maxpool_rule(F.adaptive_max_pool2d_with_indices, 2, 4))
    put(F.adaptive_max_pool3d, maxpool_rule(F.adaptive_max_pool3d_with_indices, 2, 5))
    # decomposed into exact rules
    put(F.softmax, softmax_rule(False, True))
    put(F.log_softmax, softmax_rule(True, True))
    for fn in (torch.softmax, T.softmax):
        put(fn, softmax_rule(False, False))
    for fn in (torch.log_softmax, T.log_softmax):
        put(fn, softmax_rule(True, False))


def _normalisation_rules(put: Put) -> None:
    """Normalisations by the input's own statistics, norms, attention."""
    T = torch.Tensor
    for fn in (F.layer_norm, torch.layer_norm):
        put(fn, layer_norm_rule)
    for fn in (F.group_norm, torch.group_norm):
        put(fn, group_norm_rule)
    for fn in (F.instance_norm, torch.instance_norm):
        put(fn, instance_norm_rule)
    for fn in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)):
        put(fn, rms_norm_rule)
    put(F.normalize, normalize_rule)
    put(F.batch_norm, batch_norm_rule)  # (torch.batch_norm takes its arguments in another order)
    tensor_norm = vector_norm_rule(("input", "p", "dim", "keepdim", "out", "dtype"), "p", "fro")
    for fn in (torch.norm, T.norm):
        put(fn, tensor_norm)
    put(torch.linalg.vector_norm, vector_norm_rule(("input", "ord", "dim", "keepdim"), "ord", 2))
    put(torch.linalg.norm, vector_norm_rule(("input", "ord", "dim", "keepdim"), "ord", None, linalg_norm=True))
    put(F.scaled_dot_product_attention, sdpa_rule)
    put(F.multi_head_attention_forward, mha_rule)


def _reduction_rules(put: Put) -> None:
    """Maxima and minima, the fused multiply-adds, grid sampling, linear and convolutions."""
    T = torch.Tensor
    for negate, names in ((False, ("amax", "max", "maximum", "fmax")), (True, ("amin", "min", "minimum", "fmin"))):
        for holder in (torch, T):
            for name in names:
                kind = {"fmax": "maximum", "fmin": "maximum", "minimum": "maximum", "amin": "amax",
                        "min": "max"}.get(name, name)
                put(getattr(holder, name, None), max_rule(negate, kind))
    for name, product in (("baddbmm", torch.bmm), ("addbmm", lambda a, b: torch.bmm(a, b).sum(0)),
                          ("addmm", torch.mm), ("addmv", torch.mv), ("addr", torch.outer)):
        for holder in (torch, T):
            put(getattr(holder, name, None), addmm_rule(product))
    for fn in (torch.addcmul, T.addcmul):
        put(fn, addcmul_rule)
    for fn in (F.grid_sample, torch.grid_sampler):
        put(fn, grid_sample_rule)
    put(F.linear, weighted_rule(F.linear, ("input", "weight", "bias")))
    for fn in (F.conv1d, F.conv2d, F.conv3d):
        put(fn, weighted_rule(fn, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")))


# Operations that are linear in their input-dependent tensor arguments (plain gradients are exact)
# or produce no float output; anything else without a rule is reported once as unsupported.
LINEAR_NAMES = frozenset("""
add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ rsub subtract subtract_ neg neg_
__neg__ negative __pos__ positive sum mean nansum cat concat concatenate stack hstack vstack dstack
flatten unflatten view view_as reshape reshape_as permute transpose transpose_ t contiguous clone
squeeze squeeze_ unsqueeze unsqueeze_ expand expand_as repeat repeat_interleave tile narrow select index_select gather
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


def train_mode_call(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "batch_norm":
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        return bool(training)
    if name.startswith("dropout") or name.endswith("dropout"):
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        return bool(training) and p > 0
    return False


class DeepMode(TorchFunctionMode):
    """Routes nonlinear torch calls to the DeepLIFT rules while the model runs."""

    def __init__(self, tape: Tape, rules: dict[Any, Callable]) -> None:
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
            if result is not PLAIN:
                return result
        out = func(*args, **kwargs)
        if rule is None and self.tape.phase == "explain" and float_grad_output(out):
            name = call_name(func)
            if (name not in LINEAR_NAMES or train_mode_call(name, args, kwargs)) \
                    and needs_grad((args, tuple(kwargs.values()))):
                self.tape.note_unsupported(name)
        return out


def keep_float64(func, args: tuple, kwargs: dict):
    """The float64 path: a cast of a float64 tensor to float32 inside the model (EfficientViT's LiteMLA
    runs its attention in ``.float()``) keeps float64; ``PLAIN`` for every other call."""
    x = args[0] if args else None
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float64):
        return PLAIN
    if func is torch.Tensor.float:
        return x
    if any(a is torch.float32 for a in args[1:]) or kwargs.get("dtype") is torch.float32:
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: torch.float64 if v is torch.float32 else v for k, v in kwargs.items()}
        return func(*args, **kwargs)
    return PLAIN


CASTS = (torch.Tensor.float, torch.Tensor.to, torch.Tensor.type)


def float64_rules(rules: dict[Any, Callable]) -> dict[Any, Callable]:
    """``rules`` plus the casts of :func:`keep_float64` (rules of their own: none of them has another)."""
    out = dict(rules)
    for fn in CASTS:
        out[fn] = lambda tape, func, args, kwargs: keep_float64(func, args, kwargs)
    return out


class KeepFloat64(TorchFunctionMode):
    """:func:`keep_float64` for plain forward passes (the outputs that are ranked and explained)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CASTS:
            out = keep_float64(func, args, kwargs)
            if out is not PLAIN:
                return out
        return func(*args, **kwargs)
