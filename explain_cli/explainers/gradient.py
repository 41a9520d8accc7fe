"""Expected gradients (shap's ``GradientExplainer`` for PyTorch), batched over images x samples.

This computes the same quantity as ``shap.GradientExplainer(model, background)`` (input target) or
``shap.GradientExplainer((model, layer), background)`` (layer target) with
``shap_values(x, ranked_outputs=k, nsamples=n)`` and ``local_smoothing``; the definitions below are
shap's (``shap/explainers/_gradient.py``, ``_PyTorchGradient``), not a variant of ours.

For an image ``x``, an explained class ``c`` and each sample ``s = 1..n``:

* draw a background index ``rind`` uniformly from the background and ``t ~ U(0, 1)``;
* ``x_s = x + N(0, local_smoothing^2)`` noise (only when ``local_smoothing > 0``; shap adds the
  noise to the explained image, not to the background);
* interpolate ``z = t * x_s + (1 - t) * background[rind]``.

Input target (pixel space)::

    phi = mean_s  grad_z f_c(z) * (x_s - background[rind])

which is the expected-gradients estimate of the path integral: without smoothing its sum is
approximately ``f_c(x) - E_background[f_c]`` (completeness, up to Monte-Carlo error).

Layer target, with ``h`` the layer's *input* (first positional argument of its ``forward``)::

    phi = mean_s  [dF_c/dh evaluated at h(z)] * h(z)

i.e. shap multiplies by the layer input at the interpolated point itself, **not** by a difference to
a background activation, so at a layer the attributions do not sum to ``f_c(x) - E[f_c]``. That is
shap's definition and we keep it; ``shap_sum`` reports the sum as it is.

A token layer (input ``(N, tokens, C)``, a ViT block) is attributed per token and channel; the values
are then put on the patch grid as ``(C, h, w)`` (``_utils.layer_map``: class/distillation/register
tokens dropped from the map, their share kept in ``shap_sum``).

The top-k classes are ranked on the raw model output of the un-noised images (descending, as shap's
``ranked_outputs`` with ``output_rank_order="max"``).

How it is computed (this is what makes it fast):

* all ``N * nsamples`` evaluation points of a batch are flattened and pushed through the model in
  chunks of ``context.batch_size`` rows, so a chunk can span several images;
* one forward per chunk feeds all k ranked outputs (k ``autograd.grad`` calls on the same graph);
* no parameter gradients; for a layer target the layer's input is captured as a fresh leaf, so the
  part of the network in front of the layer builds no autograd graph;
* the per-(image, class) sums are accumulated on the device, the first and the second half of each
  image's samples apart, so ``stability`` (``metrics.split_half_stability``) costs no evaluation.

Random numbers: image ``i``'s draws come only from ``seeds[i]`` (its own generators, drawn in sample
order; the smoothing noise in fixed blocks of samples), so the numbers do not depend on which images
share the batch, nor on ``batch_size``. They are not shap's random stream: the estimates agree with
shap's in expectation, not draw for draw.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field

from explain_cli import metrics
from explain_cli.explainers import _precision, _utils
from explain_cli.explainers import base
from explain_cli.explainers.base import Attribution, ExplainerSettings
from explain_cli.targets import BatchTargets, as_targets, expected_explained

# Smoothing noise is generated per image in blocks of this many samples, independent of batch_size,
# so that the random stream (and hence the result) does not depend on how the rows are chunked.
_NOISE_BLOCK = 32


class Settings(ExplainerSettings):
    """``explainer.*`` keys of the gradient (expected gradients) explainer."""

    name: Literal["gradient"] = "gradient"
    nsamples: int = Field(200, ge=1, le=100_000, description="Monte-Carlo samples per image (shap's nsamples).")
    local_smoothing: float = Field(
        0.0, ge=0, le=100, description="Std of the Gaussian noise added to the explained image (shap's local_smoothing).")


def _derive_seeds(seed: int) -> tuple[int, int]:
    """Two independent 64-bit seeds (draws of rind/t, and noise) from one image seed."""
    state = np.random.SeedSequence(int(seed) % 2**64).generate_state(2, dtype=np.uint64)
    return int(state[0]), int(state[1])


class _NoiseStream:
    """Standard-normal noise of one image, sample by sample, generated in fixed blocks on the device.

    Samples must be requested in increasing order (they are: the rows are traversed in order).
    """

    def __init__(self, seed: int, shape: tuple[int, ...], device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.shape = shape
        self.device = device
        self.block_index = -1
        self.block: torch.Tensor | None = None

    def take(self, start: int, stop: int) -> torch.Tensor:
        pieces = []
        pos = start
        while pos < stop:
            index = pos // _NOISE_BLOCK
            while self.block_index < index:
                self.block = torch.randn((_NOISE_BLOCK,) + self.shape, generator=self.generator,
                                         device=self.device, dtype=torch.float32)
                self.block_index += 1
            if self.block_index != index:  # pragma: no cover - rows are always visited in order
                raise RuntimeError("noise requested out of order")
            end = min(stop, (index + 1) * _NOISE_BLOCK)
            offset = index * _NOISE_BLOCK
            pieces.append(self.block[pos - offset:end - offset])
            pos = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class Explainer(base.Explainer):
    """Expected gradients (shap's GradientExplainer) at the input or at a layer's input."""

    name = "gradient"

    def __init__(self, context: base.ExplainContext) -> None:
        super().__init__(context)
        self._background_outputs: torch.Tensor | None = None
        self._warned_layers: set[str] = set()  # layers whose map cancels, warned about

    # -- helpers ---------------------------------------------------------------------------

    def background_outputs(self) -> torch.Tensor:
        """Model outputs (B, C) of the background, computed once per explainer (lazily): the base
        value of a class is the mean of its explained quantity over them."""
        if self._background_outputs is None:
            with _utils.frozen_parameters(self.context.model):
                outputs = _utils.forward_in_chunks(self.context.model, self.context.background, self.context.batch_size)
            self._background_outputs = outputs.float()
        return self._background_outputs

    # -- main ------------------------------------------------------------------------------

    def explain(self, images: torch.Tensor, targets: BatchTargets | int, seeds: Sequence[int]) -> Attribution:
        ctx = self.context
        targets = as_targets(targets)
        settings: Settings = self.settings  # type: ignore[assignment]
        model = ctx.model
        layer = ctx.layer
        device = images.device
        background = ctx.background
        n_images = images.shape[0]
        nsamples = int(settings.nsamples)
        smoothing = float(settings.local_smoothing)
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")
        if background.shape[0] < 1:
            raise ValueError("the background is empty")

        with _utils.frozen_parameters(model):
            # Rank on the raw output of the un-noised images.
            raw = _utils.forward_in_chunks(model, images, ctx.batch_size)
            selection = targets.select(raw)
            classes = selection.classes
            k = classes.shape[1]
            outputs = targets.explained(raw.float(), classes).float()
            base_values = expected_explained(targets, self.background_outputs().to(device), classes.to(device))

            # Per-image random draws, each from its own seed, in sample order.
            rinds, ts, noise_streams = [], [], []
            for seed in seeds:
                draw_seed, noise_seed = _derive_seeds(seed)
                gen = torch.Generator().manual_seed(draw_seed)
                rinds.append(torch.randint(background.shape[0], (nsamples,), generator=gen))
                ts.append(torch.rand(nsamples, generator=gen, dtype=torch.float64))
                if smoothing > 0:
                    noise_streams.append(_NoiseStream(noise_seed, tuple(images.shape[1:]), device))
            rind_all = torch.cat(rinds).to(device)
            t_all = torch.cat(ts).to(device=device, dtype=images.dtype)
            classes_dev = classes.to(device)

            phi: torch.Tensor | None = None  # (k, N, *explained shape), float32 sums
            scale = _precision.grad_scale(model)
            total = n_images * nsamples
            for start, stop in _utils.model_chunks(ctx, total):
                rows = torch.arange(start, stop, device=device)
                img = torch.div(rows, nsamples, rounding_mode="floor")
                x = images[img]
                if smoothing > 0:
                    noise = [noise_streams[i].take(max(start, i * nsamples) - i * nsamples,
                                                   min(stop, (i + 1) * nsamples) - i * nsamples)
                             for i in range(start // nsamples, (stop - 1) // nsamples + 1)]
                    x = x + (torch.cat(noise) * smoothing).to(x.dtype)
                ref = background[rind_all[start:stop]]
                t = t_all[start:stop].view((-1,) + (1,) * (images.dim() - 1))
                delta = x - ref
                z = ref + t * delta  # = t * x_s + (1 - t) * background[rind]
                row_classes = classes_dev[img]  # (rows, k)

                if layer is None:
                    z.requires_grad_(True)
                    out = _utils.as_2d(model(_utils.two_rows(z)))
                    target, multiplier = z, delta
                else:
                    with _utils.capture_layer_input(layer, make_leaf=True) as captured:
                        out = _utils.as_2d(model(_utils.two_rows(z)))
                    target = _utils.captured_feature_map(captured, ctx.layer_name, "gradient")
                    multiplier = target.detach()[: stop - start]

                # each image's first and second half of samples are summed apart (for stability)
                half = img * 2 + (rows - img * nsamples >= nsamples // 2)
                explained = targets.explained(out[: stop - start], row_classes)  # (rows, k)
                for r in range(k):
                    selected = explained[:, r].sum()
                    (grad,) = torch.autograd.grad(selected * scale, target, retain_graph=r + 1 < k)
                    grad = grad[: stop - start]  # (a single row ran twice)
                    _precision.check_gradient(grad, scale)
                    contribution = (grad.float() / scale) * multiplier.float()  # a layer input may be 16-bit
                    if phi is None:
                        phi = torch.zeros((k, 2 * n_images) + tuple(contribution.shape[1:]),
                                          dtype=torch.float32, device=device)
                    phi[r].index_add_(0, half, contribution)
                del out, explained, target, multiplier, z, delta

        assert phi is not None
        halves = phi.view((k, n_images, 2) + tuple(phi.shape[2:])).transpose(0, 1)  # (N, k, 2, *explained shape)
        values = (halves.sum(2) / nsamples).contiguous()  # (N, k, *explained shape)
        shap_sum = values.flatten(2).sum(2)  # at a token layer: every token, prefix tokens included
        values = _utils.layer_map(values, model, ctx.layer_name, layer, size=images.shape[-1])  # (N, k, C, H, W)
        _utils.warn_if_cancelling(values, ctx.layer_name, "gradient", self._warned_layers)
        stability = None
        if nsamples >= 2:
            half_maps = [_utils.layer_map(halves[:, :, h], model, ctx.layer_name, layer,
                                         size=images.shape[-1]) for h in (0, 1)]
            stability = metrics.split_half_stability(*half_maps, (nsamples // 2, nsamples - nsamples // 2))
        return Attribution(
            values=values.cpu().numpy().astype(np.float32, copy=False),
            **selection.attribution_fields(),
            outputs=outputs.cpu().numpy(),
            base_values=base_values.float().cpu().numpy(),
            shap_sum=shap_sum.cpu().numpy(),
            stability=stability,
        )
