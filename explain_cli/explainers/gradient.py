"""Expected gradients (shap's ``GradientExplainer`` for PyTorch), batched over images x samples.

At the input, and at a layer with ``path: input``, this computes the same quantity as
``shap.GradientExplainer(model, background)`` / ``shap.GradientExplainer((model, layer), background)``
with ``shap_values(x, ranked_outputs=k, nsamples=n)`` and ``local_smoothing``; those definitions are
shap's (``shap/explainers/_gradient.py``, ``_PyTorchGradient``), not a variant of ours.

For an image ``x``, an explained class ``c`` and each sample ``s = 1..n``: a background index
``rind`` and ``t`` in [0, 1] (see "Draws" below); ``x_s = x + N(0, local_smoothing^2)`` noise (only
when ``local_smoothing > 0``; shap adds the noise to the explained image, not to the background).

Input target (pixel space), ``z = t * x_s + (1 - t) * background[rind]``::

    phi = mean_s  grad_z f_c(z) * (x_s - background[rind])

its sum converges to ``f_c(x) - E_background[f_c]`` (completeness; without smoothing).

Layer target, ``path: input`` (shap's convention), with ``h`` the layer's *input* (first positional
argument of its ``forward``)::

    phi = mean_s  [dF_c/dh evaluated at h(z)] * h(z)

shap multiplies by the layer input at the interpolated point itself, not by a difference to a
background activation, so these attributions do not sum to ``f_c(x) - E[f_c]``.

Layer target, ``path: layer`` (the default; complete): the path runs in the layer's input space.
The model runs on ``x_s``; a forward pre-hook replaces the layer's input ``h(x_s)`` by
``h_s = h(b) + t (h(x_s) - h(b))`` with ``h(b)`` the layer input of ``background[rind]``; anything
that bypasses the layer (a skip connection around it) keeps the image's values::

    phi = mean_s  [dF_c/dh at h_s] * (h(x_s) - h(b))

an integrated-gradients path per reference, so the sum converges to ``f_c(x) - base_value`` with
``base_value = E_b f_c(x with the layer input h(b))`` (equal to ``E_b f_c(b)`` when nothing
bypasses the layer; B forwards without gradients per image).

A token layer (input ``(N, tokens, C)``, a ViT block) is attributed per token and channel; the values
are then put on the patch grid as ``(C, h, w)`` (``_utils.layer_map``: class/distillation/register
tokens dropped from the map, their share kept in ``shap_sum``); NesT's ``(N, blocks, tokens, C)`` goes
back onto the grid block by block. A layer whose input holds an image in several rows (window
attention, MobileViT's unfolded patches) is refused (``_utils.check_rows``).

The top-k classes are ranked on the raw model output of the un-noised images (descending, as shap's
``ranked_outputs`` with ``output_rank_order="max"``).

Draws (``sampling``): ``random`` draws ``rind`` and ``t`` independently and uniformly, as shap.
``stratified`` (default) has the same expectation with less variance (``draw_design``): the
references are used equally often and each reference's ``t`` are stratified (a randomised midpoint
rule for its integrated gradients). Either way each image's samples form two independent halves
(two designs of n/2), summed apart, so ``stability`` (``explain_cli.stability``) costs no
evaluation. ``nsamples: auto`` adds rounds (32 samples, then doubling the total) until every class's
stability reaches ``target_stability`` or ``max_nsamples`` is spent, per image.

How it is computed (this is what makes it fast):

* all evaluation points of a round are flattened and pushed through the model in chunks of
  ``context.batch_size`` rows, so a chunk can span several images;
* one forward per chunk feeds all k ranked outputs (k ``autograd.grad`` calls on the same graph);
* no parameter gradients; for a layer target the layer's input is a fresh leaf, so the part of the
  network in front of the layer builds no autograd graph.

Random numbers: image ``i``'s draws come only from ``seeds[i]`` (its own generators, drawn in sample
order; the smoothing noise in fixed blocks of samples), so the numbers do not depend on which images
share the batch, nor on ``batch_size``. They are not shap's random stream: the estimates agree with
shap's in expectation, not draw for draw.
"""

from __future__ import annotations

from typing import Literal, Sequence, Union

import numpy as np
import torch
from pydantic import Field

from explain_cli.explainers import _precision, _utils
from explain_cli.explainers import base
from explain_cli.explainers.base import Attribution
from explain_cli.stability import split_half_stability
from explain_cli.targets import BatchTargets, as_targets, expected_explained

# Smoothing noise is generated per image in blocks of this many samples, independent of batch_size,
# so that the random stream (and hence the result) does not depend on how the rows are chunked.
_NOISE_BLOCK = 32


_FIRST_ROUND = 32  # nsamples auto: samples of the first round (both halves); each later round doubles the total


class Settings(base.SampledSettings):
    """``explainer.*`` keys of the gradient (expected gradients) explainer."""

    name: Literal["gradient"] = "gradient"
    nsamples: Union[int, Literal["auto"]] = Field(
        200, description="Monte-Carlo samples per image (shap's nsamples), or 'auto': sample in rounds until the "
                         "map's split-half stability reaches target_stability (at most max_nsamples)")
    local_smoothing: float = Field(
        0.0, ge=0, le=100, description="Std of the Gaussian noise added to the explained image (shap's local_smoothing).")
    path: Literal["layer", "input"] = Field(
        "layer", description="at a layer: 'layer' interpolates the layer's input (complete: the values add up to "
                             "output - base_value); 'input' interpolates the image, as shap's GradientExplainer")
    sampling: Literal["stratified", "random"] = Field(
        "stratified", description="'stratified': every background image used equally often, t stratified per "
                                  "reference; 'random': independent draws as shap (same expectation, more noise)")


def round_sizes(settings: Settings) -> list[int]:
    """Samples per image added in each round: one round of ``nsamples``, or for ``auto`` a first round
    of 32 and then rounds that double the total, the last one cut at ``max_nsamples``."""
    if settings.nsamples != "auto":
        return [int(settings.nsamples)]
    cap = int(settings.max_nsamples)
    sizes = [min(_FIRST_ROUND, cap)]
    while sum(sizes) < cap:
        sizes.append(min(sum(sizes), cap - sum(sizes)))
    return sizes


def draw_design(n: int, n_refs: int, generator: torch.Generator,
                stratified: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Background indices (n,) and path positions t (n,) of ``n`` samples, each sample an unbiased
    draw of (reference uniform over the background, t uniform on [0, 1]).

    ``random``: independent draws (shap's). ``stratified`` (our own, for lower variance at the same
    expectation): the references go round the background in full passes (each used ``n // B`` times)
    plus a random subset without replacement for the rest, so every reference is used equally often
    in expectation and at most one time more than any other; a reference used ``c`` times gets
    one ``t`` in each of ``[j/c, (j+1)/c)``, i.e. a randomised midpoint rule for its integrated
    gradients (expected gradients is the mean over references of integrated gradients). With
    ``n < B`` (each reference once at most) the t are stratified over all ``n`` samples instead.
    """
    if not stratified:
        return (torch.randint(n_refs, (n,), generator=generator),
                torch.rand(n, generator=generator, dtype=torch.float64))
    passes, extra = divmod(n, n_refs)
    rind = torch.cat([torch.arange(n_refs).repeat(passes), torch.randperm(n_refs, generator=generator)[:extra]])
    jitter = torch.rand(n, generator=generator, dtype=torch.float64)
    if passes == 0:
        return rind, (torch.randperm(n, generator=generator).double() + jitter) / max(n, 1)
    counts = torch.bincount(rind, minlength=n_refs)
    starts = torch.cumsum(counts, 0) - counts
    # a random order within each reference's samples, then its j-th sample gets the j-th stratum
    order = torch.argsort(rind.double() + torch.rand(n, generator=generator, dtype=torch.float64))
    stratum = torch.empty(n, dtype=torch.long)
    stratum[order] = torch.arange(n) - starts[rind[order]]
    return rind, (stratum.double() + jitter) / counts[rind].double()


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


class _Draws:
    """One image's random draws: its own generators, used in sample order across rounds."""

    def __init__(self, seed: int, n_refs: int, stratified: bool, noise_shape: tuple[int, ...] | None,
                 device: torch.device) -> None:
        draw_seed, noise_seed = _derive_seeds(seed)
        self.generator = torch.Generator().manual_seed(draw_seed)
        self.n_refs = n_refs
        self.stratified = stratified
        self.noise = None if noise_shape is None else _NoiseStream(noise_seed, noise_shape, device)
        self.used = [0, 0]  # samples so far in each half

    def round(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rind, t, half) of one round: two independent designs of ``size // 2`` and the rest, so
        the two halves stay independent estimates (what split-half stability needs)."""
        first = size // 2
        pieces = [draw_design(n, self.n_refs, self.generator, self.stratified) for n in (first, size - first)]
        self.used[0] += first
        self.used[1] += size - first
        half = torch.cat([torch.zeros(first, dtype=torch.long), torch.ones(size - first, dtype=torch.long)])
        return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]), half


class Explainer(base.Explainer):
    """Expected gradients (shap's GradientExplainer) at the input or at a layer's input."""

    name = "gradient"

    def __init__(self, context: base.ExplainContext) -> None:
        super().__init__(context)
        self._background_outputs: torch.Tensor | None = None
        self._background_layer: torch.Tensor | None = None
        self._warned_layers: set[str] = set()  # layers whose map cancels, warned about

    # -- helpers ---------------------------------------------------------------------------

    @property
    def layer_path(self) -> bool:
        """True when the path runs in the layer's input space (a layer target with ``path: layer``)."""
        return self.context.layer is not None and self.settings.path == "layer"

    def background_outputs(self) -> torch.Tensor:
        """Model outputs (B, C) of the background, computed once per explainer (lazily): the base
        value of a class is the mean of its explained quantity over them."""
        if self._background_outputs is None:
            with _utils.frozen_parameters(self.context.model):
                outputs = _utils.forward_in_chunks(self.context.model, self.context.background, self.context.batch_size)
            self._background_outputs = outputs.float()
        return self._background_outputs

    def background_layer_inputs(self) -> torch.Tensor:
        """The layer's input h(b) for every background image (B, *layer input shape), computed once."""
        if self._background_layer is None:
            ctx = self.context
            pieces = []
            with torch.no_grad():
                for a, b in _utils.chunk_ranges(ctx.background.shape[0], max(1, int(ctx.batch_size))):
                    with _utils.capture_layer_input(ctx.layer) as captured:
                        ctx.model(ctx.background[a:b])
                    pieces.append(_utils.captured_feature_map(captured, ctx.layer_name, "gradient", rows=b - a).detach())
            self._background_layer = torch.cat(pieces)
        return self._background_layer

    def _layer_base_values(self, images: torch.Tensor, classes: torch.Tensor, targets: BatchTargets) -> torch.Tensor:
        """(N, k) ``E_b f(x with the layer input h(b))`` in the explained quantity: the path's start,
        averaged over the background (B forwards per image without gradients; equal to E_b f(b) when
        nothing bypasses the layer)."""
        ctx = self.context
        refs = self.background_layer_inputs()
        n_refs = refs.shape[0]
        sums = torch.zeros(classes.shape, dtype=torch.float64, device=images.device)
        total = images.shape[0] * n_refs
        with torch.no_grad():
            for start, stop in _utils.chunk_ranges(total, max(1, int(ctx.batch_size))):
                rows = torch.arange(start, stop, device=images.device)
                img = torch.div(rows, n_refs, rounding_mode="floor")
                ref = refs[rows - img * n_refs]
                with _utils.replace_layer_input(ctx.layer, lambda h: ref.to(h.dtype)):
                    out = _utils.as_2d(ctx.model(images[img]))
                _utils.count_evaluations(stop - start)
                sums.index_add_(0, img, targets.explained(out.float(), classes[img]).double())
        return (sums / n_refs).float()

    # -- main ------------------------------------------------------------------------------

    def evaluations_per_image(self) -> int | None:
        """The samples, the ranking forward and (path layer) one forward per background image;
        None for ``nsamples: auto`` (the count is decided per image as it runs)."""
        if self.settings.nsamples == "auto":
            return None
        starts = self.context.background.shape[0] if self.layer_path else 0
        return int(self.settings.nsamples) + 1 + starts

    def explain(self, images: torch.Tensor, targets: BatchTargets | int, seeds: Sequence[int]) -> Attribution:
        ctx = self.context
        targets = as_targets(targets)
        settings: Settings = self.settings  # type: ignore[assignment]
        model = ctx.model
        device = images.device
        background = ctx.background
        n_images = images.shape[0]
        smoothing = float(settings.local_smoothing)
        auto = settings.nsamples == "auto"
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")
        if background.shape[0] < 1:
            raise ValueError("the background is empty")

        with _utils.frozen_parameters(model):
            # Class selection and output gathering, each in this one place: rank on the raw output of
            # the un-noised images.
            raw = _utils.forward_in_chunks(model, images, ctx.batch_size)
            selection = targets.select(raw)
            classes = selection.classes
            outputs = targets.explained(raw.float(), classes).float()
            classes_dev = classes.to(device)
            if self.layer_path:
                base_values = self._layer_base_values(images, classes_dev, targets)
            else:
                base_values = expected_explained(targets, self.background_outputs().to(device), classes_dev)

            draws = [_Draws(seed, background.shape[0], settings.sampling == "stratified",
                            tuple(images.shape[1:]) if smoothing > 0 else None, device) for seed in seeds]
            sums: list[torch.Tensor | None] = [None]  # (k, 2N, *explained shape) float32 per-half sums
            stability, capped = self._sample_rounds(images, classes_dev, targets, draws, sums, selection.valid)

        phi = sums[0]
        assert phi is not None
        k = classes.shape[1]
        used = torch.tensor([sum(d.used) for d in draws], dtype=torch.float32, device=phi.device)
        halves = phi.view((k, n_images, 2) + tuple(phi.shape[2:])).transpose(0, 1)  # (N, k, 2, *explained shape)
        values = (halves.sum(2) / used.view((-1,) + (1,) * (halves.dim() - 2))).contiguous()
        shap_sum = values.flatten(2).sum(2)  # at a token layer: every token, prefix tokens included
        values = _utils.layer_map(values, model, ctx.layer_name, ctx.layer, size=tuple(images.shape[1:]))  # (N, k, C, H, W)
        _utils.warn_if_cancelling(values, ctx.layer_name, "gradient", self._warned_layers)
        return Attribution(
            values=values.cpu().numpy().astype(np.float32, copy=False),
            **selection.attribution_fields(),
            outputs=outputs.cpu().numpy(),
            base_values=base_values.float().cpu().numpy(),
            shap_sum=shap_sum.cpu().numpy(),
            stability=stability if min(sum(d.used) for d in draws) >= 2 else None,
            nsamples_used=np.array([sum(d.used) for d in draws], dtype=np.int64),
            nsamples_capped=capped if auto else None,
        )

    def _sample_rounds(self, images: torch.Tensor, classes_dev: torch.Tensor, targets: BatchTargets,
                       draws: list, sums: list, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rounds of samples (one for a fixed nsamples; for auto, more for the images whose
        split-half stability is below the target, up to max_nsamples): each image's (k,) stability
        and whether auto stopped at the cap."""
        settings: Settings = self.settings  # type: ignore[assignment]
        auto = settings.nsamples == "auto"
        n_images = images.shape[0]
        active = list(range(n_images))
        stability = np.full((n_images, classes_dev.shape[1]), np.nan)
        capped = np.zeros(n_images, dtype=bool)
        rounds = round_sizes(settings)
        for round_index, size in enumerate(rounds):
            self._run_round(images, classes_dev, targets, draws, active, size, sums)
            still = []
            for i in active:
                stability[i] = self._stability(sums[0], i, draws[i].used, tuple(images.shape[1:]))
                asked = stability[i][valid[i]]  # the batch's padding slots do not count
                finite = asked[np.isfinite(asked)]
                reached = finite.size == 0 or float(finite.min()) >= settings.target_stability
                if auto and not reached and round_index + 1 == len(rounds):
                    capped[i] = True
                elif auto and not reached:
                    still.append(i)
            active = still
            if not active:
                break
        return stability, capped

    def _stability(self, phi: torch.Tensor, i: int, used: list[int], size: tuple[int, ...]) -> np.ndarray:
        """(k,) split-half stability of image ``i`` from its two half sums (NaN with an empty half)."""
        if min(used) < 1:
            return np.full(phi.shape[0], np.nan)
        half_maps = [_utils.layer_map(phi[:, 2 * i + h][None], self.context.model, self.context.layer_name,
                                      self.context.layer, size=size) for h in (0, 1)]
        return split_half_stability(*half_maps, (used[0], used[1]))[0]

    def _forward_rows(self, x: torch.Tensor, ref: torch.Tensor, t_rows: torch.Tensor, rows: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's outputs at the interpolated points of a chunk, the tensor the gradients are of
        (the input, or the layer's input) and what they multiply: the image's difference from the
        reference (input), the layer input at the point (path input at a layer), or the layer
        input's difference from the reference's (path layer)."""
        ctx = self.context
        settings: Settings = self.settings  # type: ignore[assignment]
        if ctx.layer is None:
            delta = x - ref
            target = (ref + t_rows.view((-1,) + (1,) * (x.dim() - 1)) * delta).requires_grad_(True)
            return _utils.as_2d(ctx.model(target)), target, delta[:rows]
        if settings.path == "input":
            z = ref + t_rows.view((-1,) + (1,) * (x.dim() - 1)) * (x - ref)
            with _utils.capture_layer_input(ctx.layer, make_leaf=True) as captured:
                out = _utils.as_2d(ctx.model(z))
            target = _utils.captured_feature_map(captured, ctx.layer_name, "gradient", rows=z.shape[0])
            return out, target, target.detach()[:rows]
        differences: list[torch.Tensor] = []

        def interpolate(h: torch.Tensor) -> torch.Tensor:
            start_point = ref.to(h.dtype)
            delta_h = h.detach() - start_point
            differences.append(delta_h)
            return (start_point + t_rows.to(h.dtype).view((-1,) + (1,) * (h.dim() - 1)) * delta_h
                    ).requires_grad_(True)

        with _utils.replace_layer_input(ctx.layer, interpolate) as captured:
            out = _utils.as_2d(ctx.model(x))
        target = _utils.captured_feature_map(captured, ctx.layer_name, "gradient")
        return out, target, differences[-1][:rows]

    @staticmethod
    def _add_contributions(sums: list[torch.Tensor | None], explained: torch.Tensor, target: torch.Tensor,
                           multiplier: torch.Tensor, rows: int, slots: torch.Tensor, scale: float,
                           halves: int) -> None:
        """Each class's gradient times the multiplier, added to the half sums (k, halves, ...) by slot."""
        k = explained.shape[1]
        for r in range(k):
            selected = explained[:, r].sum()
            (grad,) = torch.autograd.grad(selected * scale, target, retain_graph=r + 1 < k)
            grad = grad[:rows]
            _precision.check_gradient(grad, scale)
            contribution = (grad.float() / scale) * multiplier.float()  # a layer input may be 16-bit
            if sums[0] is None:
                sums[0] = torch.zeros((k, halves) + tuple(contribution.shape[1:]),
                                      dtype=torch.float32, device=contribution.device)
            sums[0][r].index_add_(0, slots, contribution)

    def _run_round(self, images: torch.Tensor, classes: torch.Tensor, targets: BatchTargets, draws: list[_Draws],
                   active: list[int], size: int, sums: list[torch.Tensor | None]) -> None:
        """Evaluate one round of ``size`` samples for each active image and add them to the half sums.

        All rows of the round are flattened (image-major) and pushed through the model in chunks of
        ``batch_size`` rows, so a chunk can span several images.
        """
        ctx = self.context
        settings: Settings = self.settings  # type: ignore[assignment]
        device = images.device
        smoothing = float(settings.local_smoothing)
        rinds, ts, halves, samples = [], [], [], []
        for i in active:
            first_sample = sum(draws[i].used)
            rind, t, half = draws[i].round(size)
            rinds.append(rind)
            ts.append(t)
            halves.append(half + 2 * i)
            samples.append(torch.arange(first_sample, first_sample + size))
        rind_all = torch.cat(rinds).to(device)
        t_all = torch.cat(ts).to(device=device, dtype=images.dtype)
        slot_all = torch.cat(halves).to(device)  # image * 2 + half
        sample_all = torch.cat(samples)
        image_all = torch.tensor(active).repeat_interleave(size)
        refs = self.background_layer_inputs() if self.layer_path else ctx.background
        scale = _precision.grad_scale(ctx.model)

        for start, stop in _utils.model_chunks(ctx, rind_all.shape[0]):  # CPU auto: the first calls are timed
            img = image_all[start:stop].to(device)
            x = images[img]
            if smoothing > 0:
                noise = []
                for i in torch.unique_consecutive(image_all[start:stop]).tolist():
                    own = sample_all[start:stop][image_all[start:stop] == i]
                    noise.append(draws[i].noise.take(int(own[0]), int(own[-1]) + 1))
                x = x + (torch.cat(noise) * smoothing).to(x.dtype)
            ref = refs[rind_all[start:stop]]
            row_classes = classes[img]  # (rows, k)
            t_rows = t_all[start:stop]

            # a single row runs as two copies (_utils.two_rows: torch's CPU batch-norm backward is
            # wrong for one row); only the first copy is used
            rows = stop - start
            if rows == 1:
                x, ref, t_rows = _utils.two_rows(x), _utils.two_rows(ref), _utils.two_rows(t_rows)
            out, target, multiplier = self._forward_rows(x, ref, t_rows, rows)
            _utils.count_evaluations(rows)
            explained = targets.explained(out[:rows], row_classes)  # (rows, k)
            self._add_contributions(sums, explained, target, multiplier, rows, slot_all[start:stop], scale,
                                    2 * images.shape[0])
            del out, explained, target, multiplier
