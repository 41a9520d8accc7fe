"""``precision``: the model runs under ``torch.autocast``; everything around it stays float32.

The explainers only ever call ``context.model``; wrapping it once (``ExplainContext`` does) puts every
forward pass of every explainer under autocast without touching their code. The wrapper hands back
float32 outputs, so rankings, probabilities, base values and every sum are computed in float32, and
gradients leave the model as float32 at the input. What stays in the model's dtype is what lives
inside it: a layer target's captured input (the explainers cast it to float32 before multiplying).
Backward passes run outside the autocast region, as torch recommends; autograd replays each op in
the dtype its forward used.
"""

from __future__ import annotations

import warnings

import torch

from explain_cli.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# float16 stops at 6e-5 (normal) / 6e-8 (subnormal): a quarter of the gradient of one logit of the
# demo model at its early blocks lies below 6e-5. Explainers scale the output they differentiate
# by this power of two (exact) and divide the gradient back in float32, as a loss scaler does;
# that logit's largest gradient (0.4, at the input) stays far below float16's 65504.
_GRAD_SCALE = {torch.float16: 2.0 ** 10}


class Autocast(torch.nn.Module):
    """Runs ``module`` under ``torch.autocast(device_type, dtype)`` and returns float32 outputs."""

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.device_type = device_type
        self.dtype = dtype
        self.train(module.training)

    def __getattr__(self, name: str):
        """The wrapped model's attributes (``patch_embed``, ``num_prefix_tokens``, ...) show through,
        so code that inspects the model (token grids) sees the user's model."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def get_submodule(self, target: str) -> torch.nn.Module:
        """Dotted names are the user's model's (``blocks.3``, not ``module.blocks.3``)."""
        return self.module.get_submodule(target) if target else self

    def forward(self, *args, **kwargs):  # noqa: D102
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return out.float()
        return out


def grad_scale(model: torch.nn.Module) -> float:
    """What to multiply a model output by before differentiating it (1 unless float16)."""
    return _GRAD_SCALE.get(model.dtype, 1.0) if isinstance(model, Autocast) else 1.0


def check_gradient(grad: torch.Tensor, scale: float) -> None:
    """A scaled float16 gradient that overflowed is an error, not silent infinities."""
    if scale != 1.0 and not bool(torch.isfinite(grad).all()):
        raise RuntimeError("float16 gradients overflowed (values beyond 65504 / 1024); "
                           "use precision: bfloat16 or float32 for this model")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model behind an :class:`Autocast` wrapper (itself otherwise)."""
    return model.module if isinstance(model, Autocast) else model


def check(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of ``precision`` on ``device``; ConfigError when this torch cannot run it."""
    dtype = DTYPES[precision]
    if dtype is torch.float32:
        return dtype
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype is torch.float16:
        # torch can do it, but its float16 CPU kernels are slow: 13x (gradient) to 11x (partition)
        # slower than float32 on lite0 (measured, 2 AMD EPYC cores); bfloat16 is the CPU's low precision.
        raise ConfigError("precision", "float16 is for CUDA devices; on the CPU use bfloat16 (float16 runs "
                                       "more than 10x slower than float32 there) or float32")
    # torch.autocast only warns (and runs in float32) for a device or dtype it does not support, and
    # raises for bfloat16 on a GPU without it (before Ampere): both become a config error.
    problem = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=dtype):
                pass
        except RuntimeError as exc:
            problem = str(exc)
    problem = problem or next((str(w.message) for w in caught if "autocast" in str(w.message).lower()), None)
    if problem:
        reason = problem.splitlines()[0].rstrip(". ")
        other = " or float16" if dtype is torch.bfloat16 else ""
        raise ConfigError("precision", f"{precision} cannot run on {device_type} here: {reason}; use float32{other}")
    return dtype


def with_precision(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped for ``precision`` (the bare model for float32); wrapping twice is a no-op."""
    inner = unwrap(model)
    dtype = check(precision, device)
    if dtype is torch.float32:
        return inner
    return Autocast(inner, torch.device(device).type, dtype)
