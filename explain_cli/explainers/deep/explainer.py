"""The deep explainer: records the references once, then explains chunks of (image, reference) rows."""

from __future__ import annotations

import contextlib
import copy
import logging
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from explain_cli.errors import ConfigError
from explain_cli.explainers import _precision, _utils
from explain_cli.explainers import base
from explain_cli.explainers.base import Attribution, ExplainerSettings
from explain_cli.explainers.deep.dispatch import DeepMode, KeepFloat64, build_rules, float64_rules
from explain_cli.explainers.deep.head import explained_deep
from explain_cli.explainers.deep.tape import ModelMismatch, Tape
from explain_cli.stability import split_half_stability
from explain_cli.targets import BatchTargets, as_targets, expected_explained

log = logging.getLogger("explain_cli")

INEXACT = 1e-3  # the documented additivity bound, relative to the output differences


class Settings(ExplainerSettings):
    """``explainer.*`` keys of the deep (DeepSHAP / DeepLIFT rescale) explainer."""

    name: Literal["deep"] = "deep"
    max_background: int | None = Field(
        None, ge=1, le=10_000, description="Use at most this many background images as references (default: all).")
    float64: bool = Field(
        False, description="Run deep's forward and backward passes on a float64 copy of a float32 model (casts to "
                           "float32 inside it stay float64): for models whose own float32 rounding their divisions "
                           "amplify (EfficientViT's LiteMLA), where float32 attributions do not add up.")


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
        settings: Settings = self.settings  # type: ignore[assignment]
        if settings.float64 and context.precision != "float32":
            raise ConfigError("explainer.float64", f"float64 runs a float32 model in float64; with precision: "
                                                   f"{context.precision} use one of the two")
        self._rules = float64_rules(build_rules()) if settings.float64 else build_rules()
        self._model: torch.nn.Module | None = None  # what runs: the model, or its float64 copy
        self._layer: torch.nn.Module | None = None
        self._background_outputs: torch.Tensor | None = None  # (B, outputs) float64
        self._tape: Tape | None = None
        self._layer_reference: torch.Tensor | None = None  # (B, ...) layer input of the background
        self._warned: set[str] = set()  # op names without a rule, warned about
        self._warned_layers: set[str] = set()  # layers whose map cancels, warned about

    # -- helpers ---------------------------------------------------------------------------

    def references(self) -> torch.Tensor:
        settings: Settings = self.settings  # type: ignore[assignment]
        background = self.context.background
        if background.shape[0] < 1:
            raise ValueError("the background is empty")
        if settings.max_background is not None:
            background = background[: settings.max_background]
        return background

    def _explained(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The model and layer the passes run on: the context's, or (``float64``) a float64 copy."""
        if self._model is None:
            ctx = self.context
            settings: Settings = self.settings  # type: ignore[assignment]
            model, layer = ctx.model, ctx.layer
            if settings.float64 and not isinstance(model, torch.jit.ScriptModule):
                model = copy.deepcopy(model).to(torch.float64)
                layer = None if layer is None else model.get_submodule(ctx.layer_name)
            self._model, self._layer = model, layer
        return self._model, self._layer

    def _dtype(self, x: torch.Tensor) -> torch.Tensor:
        settings: Settings = self.settings  # type: ignore[assignment]
        return x.to(torch.float64) if settings.float64 else x

    def _layer_value(self, captured: _utils.LayerInput, rows: int) -> torch.Tensor:
        return _utils.captured_feature_map(captured, self.context.layer_name, "deep", rows=rows)

    def _record(self) -> None:
        """One pass over the references: nonlinear-call inputs, layer input and model outputs."""
        ctx = self.context
        if isinstance(_precision.unwrap(ctx.model), torch.jit.ScriptModule):
            raise ConfigError("explainer.name", "the deep explainer needs an eager PyTorch model: a "
                                                "TorchScript model runs outside Python, so its nonlinear "
                                                "operations cannot be given DeepLIFT rules; use the "
                                                "gradient explainer, or load the model from its code")
        model, layer = self._explained()
        scripted = [name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)]
        if scripted:
            log.warning("deep: %s %s TorchScript: the DeepLIFT rules do not reach inside; the plain "
                        "gradient is used there (see the additivity_error column)",
                        ", ".join(scripted[:5]), "is" if len(scripted) == 1 else "are")
        refs = self._dtype(self.references())
        tape = Tape()
        outputs, layer_parts = [], []
        size = max(1, int(ctx.batch_size))
        probe = refs.shape[0] > 1 and size > 1  # the first reference alone locates the batch in every call
        plan = ([(0, 1)] if probe else []) + list(_utils.chunk_ranges(refs.shape[0], size))
        for i, (a, b) in enumerate(plan):
            chunk = refs[a:b]
            tape.start_record(b - a, first=(i == 0), probe=probe and i == 0)
            with torch.enable_grad(), DeepMode(tape, self._rules):
                if layer is None:
                    out = model(chunk.detach().clone().requires_grad_(True))
                else:
                    with _utils.capture_layer_input(layer, make_leaf=True) as captured:
                        out = model(chunk)
                    layer_value = self._layer_value(captured, b - a).detach().clone()
            self._check_stop(tape)
            if not (probe and i == 0):
                outputs.append(_utils.as_2d(out).detach().to(torch.float64))
                if layer is not None:
                    layer_parts.append(layer_value)
            del out
        tape.finish_record()
        self._background_outputs = torch.cat(outputs)
        self._layer_reference = torch.cat(layer_parts) if layer is not None else None
        self._tape = tape

    def _check_stop(self, tape: Tape) -> None:
        try:
            tape.stop()
        except ModelMismatch as exc:
            raise RuntimeError(f"deep: {exc}; DeepSHAP needs the same sequence of nonlinear calls for "
                               "every batch (a feed-forward model without data-dependent control flow)") from None

    def _ensure_record(self) -> None:
        if self._tape is None:
            self._record()

    def background_mean(self) -> torch.Tensor:
        """Mean model output over the references (float64), computed once per explainer."""
        with _utils.frozen_parameters(self._explained()[0]), _full_float32():
            self._ensure_record()
        assert self._background_outputs is not None
        return self._background_outputs.mean(0)

    def _warn_unsupported(self, tape: Tape) -> None:
        new = sorted(set(tape.unsupported) - self._warned)
        if new:
            self._warned.update(new)
            log.warning("deep: no DeepLIFT rule for %s; the plain gradient is used there, so the "
                        "attributions may not add up (see the additivity_error column)", ", ".join(new))

    def _warn_inexact(self, tape: Tape, shap_sum: torch.Tensor, outputs: torch.Tensor,
                      base_values: torch.Tensor, spread: torch.Tensor) -> None:
        """Warn (once) when the sums miss ``f(x) - E f(r)`` by more than the documented bound although no
        op went without a rule: float32 rounding that the model amplifies, e.g. a division by a small
        input-dependent denominator (EfficientViT's LiteMLA). Input target only (at a layer a bypassing
        skip path makes the sums incomplete by design)."""
        settings: Settings = self.settings  # type: ignore[assignment]
        if (tape.unsupported or "inexact" in self._warned or self._background_outputs is None
                or self.context.precision != "float32"):  # 16-bit forward passes have their own bound
            return
        scale = torch.maximum((outputs - base_values).abs(), spread)
        relative = (shap_sum.to(outputs.device) - (outputs - base_values)).abs() / scale.clamp_min(1e-12)
        worst = float(relative.max())
        if worst <= INEXACT:
            return
        self._warned.add("inexact")
        divisions = sum(kind == "divide" for kind, _ in tape.calls)
        culprit = (f"its {divisions} division(s) by input-dependent tensors (div)" if divisions
                   else "ill-conditioned ops")
        advice = ("" if settings.float64 else "; set explainer.float64: true to run deep in float64")
        log.warning("deep: the attributions miss f(x) - E f(r) by up to %.1e of the output differences although "
                    "every op has an exact rule: the model amplifies rounding through %s%s", worst, culprit, advice)

    # -- main ------------------------------------------------------------------------------

    def evaluations_per_image(self) -> int:
        return int(self.references().shape[0]) + 1  # one row per reference and the ranking forward

    def _forward_chunk(self, tape: Tape, model: torch.nn.Module, layer: Any, x: torch.Tensor, refs: torch.Tensor,
                       ref: torch.Tensor, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One chunk of (image, reference) rows through the model under the DeepLIFT rules: the
        outputs, the tensor the values are of (the input or the layer's input, a leaf) and its
        difference from the reference's."""
        tape.start_explain(ref)
        with torch.enable_grad(), DeepMode(tape, self._rules):
            if layer is None:
                target = x.detach().clone().requires_grad_(True)
                out = _utils.as_2d(model(target))
                delta = (x - refs[ref]).detach()
            else:
                with _utils.capture_layer_input(layer, make_leaf=True) as captured:
                    out = _utils.as_2d(model(x))
                target = self._layer_value(captured, x.shape[0])
                assert self._layer_reference is not None
                delta = target.detach().to(acc_dtype) - self._layer_reference[ref].to(acc_dtype)
        self._check_stop(tape)
        return out, target, delta

    @staticmethod
    def _accumulate(phi: torch.Tensor | None, explained: torch.Tensor, target: torch.Tensor, delta: torch.Tensor,
                    half: torch.Tensor, k: int, scale: float, acc_dtype: torch.dtype, halves: int) -> torch.Tensor:
        """Add each class's multipliers times the differences of a chunk to ``phi`` (k, halves, ...),
        by image half (created on the first chunk)."""
        for r in range(k):
            selected = explained[:, r].sum()
            (grad,) = torch.autograd.grad(selected * scale, target, retain_graph=r + 1 < k, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(target)
            _precision.check_gradient(grad, scale)
            contribution = (grad.to(acc_dtype) / scale) * delta.to(acc_dtype)
            if phi is None:
                phi = torch.zeros((k, halves) + tuple(contribution.shape[1:]), dtype=acc_dtype,
                                  device=contribution.device)
            phi[r].index_add_(0, half, contribution)
        assert phi is not None
        return phi

    def explain(self, images: torch.Tensor, targets: BatchTargets | int, seeds: Sequence[int]) -> Attribution:
        ctx = self.context
        targets = as_targets(targets)
        settings: Settings = self.settings  # type: ignore[assignment]
        model, layer = self._explained()
        shown = images
        images = self._dtype(images)
        device = images.device
        n_images = images.shape[0]
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")

        with _utils.frozen_parameters(model), _full_float32():
            self._ensure_record()
            tape = self._tape
            assert tape is not None and self._background_outputs is not None
            refs = self._dtype(self.references())
            n_refs = refs.shape[0]

            with KeepFloat64() if settings.float64 else contextlib.nullcontext():
                raw = _utils.forward_in_chunks(model, images, ctx.batch_size)
            selection = targets.select(raw)
            classes = selection.classes
            k = classes.shape[1]
            outputs = targets.explained(raw.to(torch.float64), classes)
            ref_outputs = self._background_outputs.to(device)
            base_values = expected_explained(targets, ref_outputs, classes)
            classes_dev = classes.to(device)

            acc_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
            phi: torch.Tensor | None = None  # (k, N, *explained shape)
            scale = _precision.grad_scale(model)
            for start, stop in _utils.model_chunks(ctx, n_images * n_refs):
                rows = torch.arange(start, stop, device=device)
                img = torch.div(rows, n_refs, rounding_mode="floor")
                ref = rows - img * n_refs
                out, target, delta = self._forward_chunk(tape, model, layer, images[img], refs, ref, acc_dtype)
                _utils.count_evaluations(stop - start)
                explained = explained_deep(targets.spec, out[: stop - start], ref_outputs[ref].to(out.dtype),
                                           classes_dev[img])
                half = img * 2 + (ref >= n_refs // 2)  # the two halves of the background, summed apart
                phi = self._accumulate(phi, explained, target, delta, half, k, scale, acc_dtype, 2 * n_images)
                del out, explained, target, delta
            self._warn_unsupported(tape)

        assert phi is not None
        return self._attribution(phi, n_refs, outputs, base_values, ref_outputs, classes, selection, targets,
                                 tape, layer, tuple(shown.shape[1:]))

    def _attribution(self, phi: torch.Tensor, n_refs: int, outputs: torch.Tensor, base_values: torch.Tensor,
                     ref_outputs: torch.Tensor, classes: torch.Tensor, selection: Any, targets: BatchTargets,
                     tape: Tape, layer: Any, shape: tuple[int, ...]) -> Attribution:
        """The half sums averaged over the references, checked for additivity (at the input), mapped
        onto the image, with the split-half stability of the two halves of the background."""
        ctx = self.context
        k, n_images = phi.shape[0], phi.shape[1] // 2
        halves = phi.view((k, n_images, 2) + tuple(phi.shape[2:])).transpose(0, 1)  # (N, k, 2, *explained shape)
        values = (halves.sum(2) / n_refs).contiguous()  # (N, k, *explained shape)
        shap_sum = values.flatten(2).to(torch.float64).sum(2)  # token layer: prefix tokens included
        if layer is None:
            spread = torch.stack([(outputs[i] - targets.explained(ref_outputs, classes[i].expand(n_refs, -1))).abs()
                                  .mean(0) for i in range(n_images)])
            self._warn_inexact(tape, shap_sum, outputs, base_values, spread)
        values = _utils.layer_map(values, ctx.model, ctx.layer_name, ctx.layer, size=shape)  # (N, k, C, h, w)
        _utils.warn_if_cancelling(values, ctx.layer_name, "deep", self._warned_layers)
        stability = None
        if n_refs >= 2:
            half_maps = [_utils.layer_map(halves[:, :, h], ctx.model, ctx.layer_name, ctx.layer, size=shape)
                         for h in (0, 1)]
            stability = split_half_stability(*half_maps, (n_refs // 2, n_refs - n_refs // 2))
        return Attribution(
            values=values.cpu().numpy().astype(np.float32, copy=False),
            **selection.attribution_fields(),
            outputs=outputs.cpu().numpy(),
            base_values=base_values.cpu().numpy(),
            shap_sum=shap_sum.cpu().numpy(),
            stability=stability,
        )
