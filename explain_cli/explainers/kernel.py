"""Kernel SHAP over superpixels or grid patches (shap's ``KernelExplainer`` as in seed 004), batched.

Seed 004 segments the image with ``skimage.segmentation.slic`` and explains a function of a 0/1
coalition vector (1 = superpixel shown, 0 = superpixel hidden) with
``shap.KernelExplainer(f, np.zeros((1, M))).shap_values(np.ones((1, M)), nsamples=...)``. This
module computes the same quantity, with shap's definitions (``shap/explainers/_kernel.py``,
``KernelExplainer.explain`` and ``solve``), but builds and evaluates the masked images itself, for
all images of a step at once.

For each image ``x``:

* **Superpixels.** SLIC runs on the CPU on the image in pixel space (the normalisation undone with
  ``context.mean``/``context.std`` and the result rounded to 8-bit, i.e. the image as decoded),
  with ``n_segments``, ``compactness``, ``sigma`` and ``start_label=0``. SLIC returns roughly,
  not exactly, ``n_segments`` superpixels; ``M`` is the number it returns (labels ``0..M-1``).
  With ``segments: {grid: G}`` the players are instead a G x G grid of patches (``M = G*G``, the
  same for every image; ``masking.grid_labels``), the players of an amortized explainer.
* **Hidden superpixels** are replaced by the ``fill`` image: ``mean`` (the image's own mean colour,
  the default of seed 004's ``mask_image``), a colour (``[r, g, b]`` or one grey level, 0-255; seed
  004 actually called ``mask_image(..., 255)``, i.e. ``fill: 255``), or ``blur(KX,KY)`` (the image
  blurred with ``cv2.blur`` and a KX-wide, KY-high box kernel, borders reflected). The fill is
  built in pixel space and normalised like the image, so shown pixels are the input unchanged
  (``explain_cli.masking``, shared with partition, the metrics and the amortized explainer).
* **Coalitions** are chosen exactly as shap's ``KernelExplainer.explain`` does: the number of
  samples is capped at ``2**M - 2``; subset sizes (paired with their complements) are enumerated
  completely, smallest first, while the budget allows, with the Shapley kernel weights; the rest of
  the budget is drawn at random by the remaining kernel weights (a drawn subset and its complement;
  repeats add weight instead of a row), and the random rows' weights are scaled to the kernel mass
  left. With ``nsamples >= 2**M - 2`` every coalition is enumerated and the result is the exact
  Shapley values of the masking game. The random part is paired (a drawn subset and its
  complement, the antithetic pairs of Covert & Lee 2021), as in shap.
* **sampling: leverage** (Leverage SHAP, Musco & Witter, ICLR 2025) keeps the enumerated part and
  draws the random part's subset sizes uniformly over the size classes instead of by the kernel
  (paired as well), each drawn row weighted by its kernel mass over its draw probability; the
  estimate converges to the same Shapley values.
* **nsamples: auto** draws 256 coalitions first (enumerating what shap enumerates at 256), then
  more of the random part (``CoalitionSampler.draw``) in rounds that double the total, until the
  stability of every class's map reaches ``target_stability`` or ``max_nsamples`` is spent, per
  image.
* **Convergence** (``value_covariance``): the covariance of the values estimated from the drawn
  coalitions themselves (Covert & Lee 2021: the central limit theorem over the paired draws,
  propagated through the constrained least squares; the enumerated rows add no variance), no
  extra model evaluation. It gives each superpixel's standard deviation (``value_std``, written to
  the values npz as ``std``) and, by default (``stability_from: variance``), the map's
  ``stability``: the share of the map's variance over the pixels that is not sampling noise,
  i.e. the expected correlation with a rerun.
* **Model output** ``v(z)``: the raw model output (e.g. logit) of each of the top-k classes (ranked
  on the raw output of the unmasked image, as shap's ``ranked_outputs``) for the masked image.
  ``f(x) = v(all shown)`` is the output of the unmasked image, ``f(all hidden)`` the output of the
  fill image.
* **Regression.** shap's ``solve`` with ``l1_reg=False``: the efficiency constraint
  ``sum(phi) = f(x) - f(all hidden)`` is enforced by eliminating the last superpixel, and the
  kernel-weighted least squares is solved for all k outputs at once (one ``lstsq`` with k
  right-hand sides, in float64). No l1 feature selection: shap's default ``num_features(10)`` would
  zero all but 10 superpixels.

Result (``Attribution``): ``segments`` is the (N, H, W) label map and ``values[n, r, c, h, w] =
phi[segment(h, w)] / C``: every pixel of a superpixel carries that superpixel's SHAP value, split
evenly over the channels, so the channel sum at any pixel (what the renderer shows, one colour per
segment) is the superpixel's value, as in seed 004's ``fill_segmentation``; the values of an
image can be read back from the saved map alone. Hence ``values.sum()`` is *not* ``sum(phi)`` (each
value is counted once per pixel): ``shap_sum`` is ``sum(phi)``. ``outputs`` is ``f(x)``,
``base_values`` is ``f(all hidden)``, so the additivity error is zero up to float rounding.
``stability`` comes from the variance estimate (``variance_stability``), or with
``stability_from: split_half`` from two more regressions per image on two halves of the drawn
coalitions (the enumerated ones in both; see ``split_half``): no extra model evaluation either way.

Batching: the rows of all images of a call (one all-hidden row plus the coalitions of each image)
are built on the model's device from the coalition masks and the label maps, and evaluated in
model calls of ``context.batch_size`` rows; a call can span several images. The CPU work of an
image (SLIC, sampling, fill) is done while the model calls of the previous image run on the device
(nothing waits for the device until all rows are issued), so on a GPU it is mostly hidden.

Random numbers: image ``i``'s coalitions come only from a numpy ``Generator`` seeded with
``seeds[i]``, so results do not depend on which images share the batch, nor on ``batch_size``.
They are not shap's random stream (shap uses numpy's global generator).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import Field, field_validator

from explain_cli import autobatch, masking
from explain_cli.errors import ConfigError
from explain_cli.explainers import _utils
from explain_cli.explainers import base
from explain_cli.explainers.base import Attribution
from explain_cli.masking import SegmentSettings
from explain_cli.stability import split_half_stability
from explain_cli.targets import BatchTargets, as_targets

_FIRST_ROUND = 256  # nsamples auto: coalitions of the first round
SAMPLINGS = ("shap", "leverage")


class Settings(base.SampledSettings):
    """``explainer.*`` keys of the kernel (Kernel SHAP over superpixels) explainer."""

    name: Literal["kernel"] = "kernel"
    segments: SegmentSettings = Field(default_factory=SegmentSettings)
    nsamples: Union[int, Literal["auto"]] = Field(
        1000, description="model evaluations (coalitions) per image (shap's nsamples), at most 2**M - 2 are used; "
                          "or 'auto': draw in rounds until the map's stability reaches target_stability")
    sampling: Literal["shap", "leverage"] = Field(
        "shap", description="how the random coalitions are drawn: 'shap' (subset sizes by the Shapley kernel, "
                            "as shap's KernelExplainer) or 'leverage' (every subset size equally often, "
                            "reweighted: Leverage SHAP); both paired, after the same enumerated sizes")
    stability_from: Literal["variance", "split_half"] = Field(
        "variance", description="how the map's stability (topk.csv, and what nsamples auto stops on) is estimated: "
                                "'variance' from Covert & Lee's variance of the values, 'split_half' from two "
                                "regressions on halves of the drawn coalitions")
    fill: Any = Field("mean", description="hidden superpixels: 'mean' (the image's mean colour), a colour "
                                          "[r, g, b] or one grey level (0-255), or 'blur(KX,KY)'")

    @field_validator("fill")
    @classmethod
    def _fill(cls, v: Any) -> Any:
        """Canonical form: 'mean', [r, g, b] floats, or 'blur(KX,KY)'."""
        return masking.parse_fill(v)


# -- the pieces, usable on their own (the tests use them to build shap's reference function) -------

def sample_coalitions(m: int, nsamples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """shap's KernelExplainer coalitions for ``m`` features: (rows, m) bool masks and kernel weights.

    A line-by-line port of the sampling in ``KernelExplainer.explain`` (shap 0.51), with ``rng`` in
    place of numpy's global generator. ``m >= 2``.
    """
    masks, weights, _ = sample_coalitions_split(m, nsamples, rng)
    return masks, weights


def sample_coalitions_split(m: int, nsamples: int,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`sample_coalitions` and the number of its leading rows that were enumerated (not drawn)."""
    sampler = CoalitionSampler(m, nsamples, rng)
    return sampler.masks, sampler.weights, sampler.nfixed


class CoalitionSampler:
    """shap's KernelExplainer coalitions (a port of ``KernelExplainer.explain``'s sampling, shap 0.51,
    with ``rng`` in place of numpy's global generator), able to draw more rows later
    (``nsamples: auto``): :meth:`draw` continues the random part with the same distribution (a
    subset size by the remaining kernel weights, a uniform subset of that size and its complement;
    a repeat adds weight instead of a row), and :attr:`weights` rescales all drawn rows to the kernel
    mass left, as shap does once at the end. ``m >= 2``.
    """

    def __init__(self, m: int, nsamples: int, rng: np.random.Generator, sampling: str = "shap") -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, not {sampling!r}")
        self.m = m
        self.rng = rng
        self.sampling = sampling
        self.limit = 2**m - 2 if m <= 30 else None
        if self.limit is not None:
            nsamples = min(nsamples, self.limit)
        num_subset_sizes = int(np.ceil((m - 1) / 2.0))
        self.num_paired = int(np.floor((m - 1) / 2.0))
        weight_vector = np.array([(m - 1.0) / (i * (m - i)) for i in range(1, num_subset_sizes + 1)])
        weight_vector[:self.num_paired] *= 2
        weight_vector /= np.sum(weight_vector)

        masks, weights, num_full_subsets = self._enumerate(nsamples, weight_vector, num_subset_sizes)
        self._masks = masks
        self._weights = weights  # enumerated: kernel weights; drawn: counts, rescaled in `weights`
        self.nfixed = len(masks)
        self.num_full_subsets = num_full_subsets
        self.complete = num_full_subsets == num_subset_sizes
        self.weight_left = float(np.sum(weight_vector[num_full_subsets:]))
        remaining = weight_vector.copy()
        remaining[:self.num_paired] /= 2  # two samples (subset and complement) per draw
        remaining = remaining[num_full_subsets:]
        self.remaining = remaining / np.sum(remaining) if remaining.size else remaining
        # Per drawn row, the weight one draw adds: 1 for shap's draws (sizes drawn by the kernel
        # itself); for leverage draws (every size class equally likely) the kernel mass of the size
        # class over its draw probability, per row of a draw (importance weights).
        self.proposal = self.remaining
        self.row_weight = np.ones_like(self.remaining)
        if sampling == "leverage" and self.remaining.size:
            self.proposal = np.full(self.remaining.size, 1.0 / self.remaining.size)
            # kernel mass of a class = remaining * rows per draw; per row of a draw: / (proposal * rows)
            self.row_weight = self.remaining / self.proposal
        self.used: dict[bytes, tuple[int, int | None]] = {}
        self.unit_of: dict[bytes, int] = {}
        self.units: list[list] = []  # per distinct draw: [first row, complement row or None, draws, row weight]
        self.draw(nsamples - self.nfixed)

    def _enumerate(self, nsamples: int, weight_vector: np.ndarray, num_subset_sizes: int
                   ) -> tuple[list[np.ndarray], list[float], int]:
        """Enumerate whole subset sizes (with their complements) while the budget allows: their masks,
        kernel weights and how many sizes are complete (shap's first loop)."""
        m = self.m
        masks: list[np.ndarray] = []
        weights: list[float] = []
        num_full_subsets = 0
        num_samples_left = nsamples
        remaining_weight_vector = weight_vector.copy()
        for subset_size in range(1, num_subset_sizes + 1):
            nsubsets = math.comb(m, subset_size)
            if subset_size <= self.num_paired:
                nsubsets *= 2
            if not num_samples_left * remaining_weight_vector[subset_size - 1] / nsubsets >= 1.0 - 1e-8:
                break
            num_full_subsets += 1
            num_samples_left -= nsubsets
            if remaining_weight_vector[subset_size - 1] < 1.0:
                remaining_weight_vector /= 1 - remaining_weight_vector[subset_size - 1]
            w = weight_vector[subset_size - 1] / math.comb(m, subset_size)
            if subset_size <= self.num_paired:
                w /= 2.0
            for inds in itertools.combinations(range(m), subset_size):
                mask = np.zeros(m, dtype=bool)
                mask[list(inds)] = True
                masks.append(mask)
                weights.append(w)
                if subset_size <= self.num_paired:
                    masks.append(~mask)
                    weights.append(w)
        return masks, weights, num_full_subsets

    @property
    def masks(self) -> np.ndarray:
        return np.stack(self._masks) if self._masks else np.zeros((0, self.m), dtype=bool)

    @property
    def weights(self) -> np.ndarray:
        weights = np.asarray(self._weights, dtype=np.float64)
        drawn = weights[self.nfixed:]
        if drawn.size:
            weights[self.nfixed:] = drawn * (self.weight_left / drawn.sum())
        return weights

    def unit_array(self) -> np.ndarray:
        """(U, 4) float64 ``[first row, complement row or -1, draws, weight per row]`` per distinct
        draw (for :func:`value_covariance`)."""
        if not self.units:
            return np.zeros((0, 4))
        return np.array([[f, -1 if c is None else c, n, w] for f, c, n, w in self.units], dtype=np.float64)

    def draw(self, samples_left: int) -> int:
        """Up to ``samples_left`` more drawn rows (fewer when every coalition is in); returns how many."""
        if self.complete or samples_left <= 0:
            return 0
        if self.limit is not None:
            samples_left = min(samples_left, self.limit - len(self._masks))
        added = 0
        ind_set = self.rng.choice(len(self.remaining), 4 * samples_left, p=self.proposal)
        for ind in ind_set:
            if samples_left <= 0:
                break
            subset_size = int(ind) + self.num_full_subsets + 1
            w = float(self.row_weight[int(ind)])
            mask = np.zeros(self.m, dtype=bool)
            mask[self.rng.permutation(self.m)[:subset_size]] = True
            key = mask.tobytes()
            paired = subset_size <= self.num_paired
            if key not in self.used:
                self._masks.append(mask)
                self._weights.append(w)
                samples_left -= 1
                added += 1
                complement = None
                if samples_left > 0 and paired:
                    complement = len(self._masks)
                    self._masks.append(~mask)
                    self._weights.append(w)
                    samples_left -= 1
                    added += 1
                first = len(self._masks) - (2 if complement is not None else 1)
                self.used[key] = (first, complement)
                self.unit_of[key] = len(self.units)
                self.units.append([first, complement, 1, w])
            else:
                first, complement = self.used[key]
                self._weights[first] += w
                self.units[self.unit_of[key]][2] += 1
                if paired and samples_left > 0 and complement is not None:
                    self._weights[complement] += w
        return added


def solve(masks: np.ndarray, weights: np.ndarray, y: np.ndarray, fx: np.ndarray,
          fnull: np.ndarray) -> np.ndarray:
    """shap's ``KernelExplainer.solve`` (identity link, no l1) for k outputs at once.

    masks (S, M) 0/1, weights (S,), y (S, k) outputs of the coalitions, fx/fnull (k,) outputs with
    everything shown / hidden. Returns phi (M, k) with ``phi.sum(0) == fx - fnull`` exactly.
    """
    z = masks.astype(np.float64)
    total = np.asarray(fx, np.float64) - np.asarray(fnull, np.float64)
    m = z.shape[1]
    if m == 1:
        return total[None, :].copy()
    # eliminate the last feature with the constraint sum(phi) = fx - fnull
    target = (np.asarray(y, np.float64) - fnull) - z[:, -1:] * total
    design = z[:, :-1] - z[:, -1:]
    root = np.sqrt(weights)[:, None]
    coef = np.linalg.lstsq(root * design, root * target, rcond=None)[0]  # (M - 1, k)
    return np.concatenate([coef, (total - coef.sum(0))[None, :]], axis=0)


def value_covariance(masks: np.ndarray, weights: np.ndarray, y: np.ndarray, fx: np.ndarray, fnull: np.ndarray,
                     phi: np.ndarray, units: np.ndarray) -> np.ndarray:
    """(k, M, M) estimated covariance of the values ``phi`` (M, k) of :func:`solve`: the convergence
    estimate of Covert & Lee, "Improving KernelSHAP" (AISTATS 2021), for shap's estimator.

    Kernel SHAP solves the constrained least squares ``A phi + nu 1 = b``, ``1' phi = f(x) - f(0)``
    with sample estimates of ``A = E[z z']`` and ``b = E[z (v(z) - v(0))]``. Linearised around the
    solution (the delta method; here in :func:`solve`'s coordinates, the last value eliminated), the
    error of ``phi`` is ``H^-1`` times the error of the drawn part of the normal equations
    ``sum_i w_i d_i r_i`` (``d_i`` a row of the reduced design, ``r_i`` its residual): a mean over
    independent draws, whose covariance the central limit theorem gives from the draws themselves.
    The enumerated rows are the same in every run and add no variance. A draw is a *unit*: a subset
    and its complement together (paired sampling), so the estimate sees the antithetic pairing.
    The drawn weights are rescaled to a fixed kernel mass (a ratio of means), which the influence
    ``g_u - c_u * mean`` accounts for. ``units``: (U, 4) rows ``[first, complement or -1, draws,
    weight per row]`` (:meth:`CoalitionSampler.unit_array`). No model evaluation.
    """
    m = masks.shape[1]
    k = phi.shape[1]
    units = np.asarray(units, np.float64).reshape(-1, 4)
    if m == 1 or units.shape[0] < 2:
        return np.zeros((k, m, m))
    z = masks.astype(np.float64)
    total = np.asarray(fx, np.float64) - np.asarray(fnull, np.float64)
    design = z[:, :-1] - z[:, -1:]
    target = (np.asarray(y, np.float64) - fnull) - z[:, -1:] * total
    resid = target - design @ phi[:-1]  # (S, k)
    hinv = np.linalg.pinv(design.T @ (weights[:, None] * design))
    first = units[:, 0].astype(np.int64)
    comp = units[:, 1].astype(np.int64)
    draws, w = units[:, 2], units[:, 3]
    has = comp >= 0
    comp = np.where(has, comp, first)
    g = design[first][:, None, :] * resid[first][:, :, None]  # (U, k, M-1)
    g = g + has[:, None, None] * design[comp][:, None, :] * resid[comp][:, :, None]
    g *= w[:, None, None]
    c = w * (1.0 + has)
    mass = float(np.sum(draws * c))
    scale = float(np.sum(weights)) - float(np.sum(weights[:int(first.min())]))  # the drawn rows' kernel mass
    psi = (scale / mass) * (g - c[:, None, None] * (np.einsum("u,uka->ka", draws, g) / mass))
    # Small-sample correction (HC1 of the sandwich estimator): the residuals are fitted with M - 1
    # free values, which makes them smaller than the errors; n / (n - (M - 1)) undoes that on average
    # (without it the estimate was 15% low at 500 coalitions of 50 players), capped at 2.
    n = float(draws.sum())
    meat = np.einsum("u,uka,ukb->kab", draws, psi, psi) * (n / max(n - (m - 1), n / 2))
    cov_coef = hinv @ meat @ hinv  # (k, M-1, M-1)
    lift = np.vstack([np.eye(m - 1), -np.ones((1, m - 1))])  # phi = [coef, total - sum(coef)]
    return lift @ cov_coef @ lift.T


def variance_stability(phi: np.ndarray, cov: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(k,) the reliability of the painted maps (the quantity ``stability`` estimates: the expected
    correlation of the map with a rerun at another seed) from the covariance of the values.

    Over the pixels, each superpixel weighs its area ``a``: the map's variance is ``var_a(phi)``
    and the sampling noise adds ``tr((diag(a) - a a') cov)`` to it on average, so the share of the
    variance that is not noise is ``1 - noise / var_a(phi)``. NaN where the map is constant.
    """
    m = phi.shape[0]
    area = np.bincount(labels.ravel(), minlength=m).astype(np.float64)
    area /= area.sum()
    centred = phi - area @ phi
    var = area @ (centred * centred)  # (k,)
    weight = np.diag(area) - np.outer(area, area)
    noise = np.einsum("ij,kji->k", weight, cov)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, 1.0 - noise / np.where(var > 0, var, 1.0), np.nan)


def std_ratio(phi: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(k,) Covert & Lee's convergence measure: the largest standard deviation of a value over the
    range of the values, ``max std / (max phi - min phi)`` (their stopping rule: below 0.01)."""
    spread = phi.max(0) - phi.min(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(spread > 0, std.max(0) / np.where(spread > 0, spread, 1.0), np.nan)


def split_half(masks: np.ndarray, weights: np.ndarray, nfixed: int) -> list[np.ndarray] | None:
    """Row weights of the two split halves used for stability, or None when there is no random part.

    Why this is sound: the enumerated rows (``masks[:nfixed]``) are the same in every run at any
    seed, so both halves keep them; only the drawn rows vary between runs. They are split in draw
    order, a drawn coalition and its complement staying together, and each half's drawn weights are
    rescaled to the kernel mass left (as the full sample's are), so each half is a Kernel SHAP
    estimate with the same fixed part and half the random part: its random error has about twice the
    variance, which is what the Spearman-Brown correction assumes.
    """
    drawn = masks.shape[0] - nfixed
    if drawn < 4:
        return None
    cut = nfixed + drawn // 2
    while cut < masks.shape[0] and np.array_equal(masks[cut], ~masks[cut - 1]):
        cut += 1
    if cut >= masks.shape[0]:
        return None
    mass = weights[nfixed:].sum()
    halves = []
    for lo, hi in ((nfixed, cut), (cut, masks.shape[0])):
        w = np.zeros_like(weights)
        w[:nfixed] = weights[:nfixed]
        w[lo:hi] = weights[lo:hi] * (mass / weights[lo:hi].sum())
        halves.append(w)
    return halves


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(seed) % 2**64))


class _Image:
    """One image's CPU-side preparation and its tensors on the device."""

    def __init__(self, labels: np.ndarray, masks: np.ndarray, weights: np.ndarray,
                 labels_dev: torch.Tensor, rows_dev: torch.Tensor, fill_dev: torch.Tensor) -> None:
        self.labels = labels  # (H, W) int64, 0..M-1
        self.masks = masks  # (S, M) bool coalitions (S = 0 for a single superpixel)
        self.weights = weights  # (S,) kernel weights
        self.labels_dev = labels_dev  # (H*W,) long
        self.rows_dev = rows_dev  # (1 + S, M) bool: the all-hidden row, then the coalitions
        self.fill_dev = fill_dev  # (C, H, W) normalised fill image
        self.outputs: list[torch.Tensor] = []  # (rows, k) pieces of the model outputs, in row order
        self.nfixed = 0  # leading rows of ``masks`` that were enumerated, not drawn
        self.sampler: CoalitionSampler | None = None  # draws more coalitions (nsamples auto)
        self.capped = False  # nsamples auto: stopped at max_nsamples below target_stability


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the queue of model calls already issued (pinned, async)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class _RowQueue:
    """Coalition rows of the batch's images waiting for model calls, in order; a call takes the
    next ``count`` rows (it can span images) and each image's outputs go to its ``outputs``."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, targets: BatchTargets,
                 classes: torch.Tensor) -> None:
        self.model, self.images, self.targets, self.classes = model, images, targets, classes
        self.prepared: list[_Image] = []
        self.pending: list[tuple[int, int, int]] = []  # (image, first row, stop row) not yet evaluated
        self.rows = 0

    def add(self, item: _Image, r0: int, r1: int, index: int | None = None) -> None:
        """Rows r0:r1 of ``item``'s rows_dev (a new image unless ``index`` names a prepared one)."""
        if index is None:
            index = len(self.prepared)
            self.prepared.append(item)
        self.pending.append((index, r0, r1))
        self.rows += r1 - r0

    def flush(self, size: int) -> None:
        """Every pending row, in calls of ``size`` rows and one of the rest."""
        while self.rows >= size:
            self.evaluate(size)
        self.rest()

    def rest(self) -> None:
        """The pending rows in one call (none without any)."""
        if self.rows:
            self.evaluate(self.rows)

    def evaluate(self, count: int) -> None:
        """One model call on the next ``count`` rows."""
        pieces, taken = [], 0
        while taken < count:
            i, r0, r1 = self.pending[0]
            r_end = min(r1, r0 + count - taken)
            pieces.append((i, r0, r_end))
            taken += r_end - r0
            if r_end == r1:
                self.pending.pop(0)
            else:
                self.pending[0] = (i, r_end, r1)
        self.rows -= count
        parts = []
        for i, r0, r1 in pieces:
            item = self.prepared[i]
            parts.append(masking.compose(item.rows_dev[r0:r1], item.labels_dev, self.images[i], item.fill_dev))
        batch = parts[0] if len(parts) == 1 else torch.cat(parts)
        out = _utils.as_2d(self.model(batch))
        _utils.count_evaluations(count)
        offset = 0
        for i, r0, r1 in pieces:
            piece = out[offset:offset + r1 - r0]
            self.prepared[i].outputs.append(
                self.targets.explained(piece, self.classes[i].expand(piece.shape[0], -1)).double())
            offset += r1 - r0


class Explainer(base.Explainer):
    """Kernel SHAP over SLIC superpixels (shap's KernelExplainer with l1_reg=False)."""

    name = "kernel"
    input_only = True
    uses_background = False
    backward = False

    def __init__(self, context: base.ExplainContext) -> None:
        super().__init__(context)
        self._check_layer()  # fail before the first step, not after the model has run

    def _check_layer(self) -> None:
        if self.context.layer is not None:
            raise ConfigError("model.layer", "the kernel explainer masks superpixels of the input image and "
                                             f"cannot explain layer '{self.context.layer_name}'; "
                                             "set model.layer: input")

    @property
    def images_per_step(self) -> int:
        """Images per explain() call. On a GPU 8, so the CPU work of one image (SLIC, sampling)
        overlaps the model calls of the previous one; on the CPU just enough images to fill a few
        model batches (each image brings nsamples + 1 rows), so a killed run loses little work."""
        if self.context.device.type != "cpu":
            return 8
        rows = self.first_round() + 1
        return max(1, min(8, math.ceil(4 * max(1, int(self.context.batch_size)) / rows)))

    def first_round(self) -> int:
        """Coalitions drawn first: ``nsamples``, or for ``auto`` 256 (then rounds that double the total
        up to ``max_nsamples``; the enumerated subset sizes are those shap enumerates at 256)."""
        settings: Settings = self.settings  # type: ignore[assignment]
        if settings.nsamples == "auto":
            return min(_FIRST_ROUND, int(settings.max_nsamples))
        return int(settings.nsamples)

    def _prepare(self, pixels: np.ndarray, seed: int, device: torch.device, dtype: torch.dtype) -> _Image:
        ctx = self.context
        settings: Settings = self.settings  # type: ignore[assignment]
        labels = masking.players(pixels, settings.segments)
        m = int(labels.max()) + 1
        nfixed = 0
        sampler = None
        if m >= 2:
            sampler = CoalitionSampler(m, self.first_round(), _rng(seed), settings.sampling)
            masks, weights, nfixed = sampler.masks, sampler.weights, sampler.nfixed
        else:  # a single superpixel has the whole effect: only f(all hidden) is needed
            masks, weights = np.zeros((0, 1), dtype=bool), np.zeros(0)
        rows = np.concatenate([np.zeros((1, masks.shape[1]), dtype=bool), masks])
        fill = masking.normalise(masking.fill_pixels(pixels, settings.fill), ctx.mean, ctx.std)
        item = _Image(labels, masks, weights, _to_device(labels.reshape(-1), device), _to_device(rows, device),
                      _to_device(fill.numpy(), device).to(dtype))
        item.nfixed = nfixed
        item.sampler = sampler
        return item

    def evaluations_per_image(self) -> int | None:
        if self.settings.nsamples == "auto":
            return None  # decided per image as it runs
        return int(self.settings.nsamples) + 2  # coalitions (fewer for few superpixels), all hidden, ranking

    def explain(self, images: torch.Tensor, targets: BatchTargets | int, seeds: Sequence[int]) -> Attribution:
        """Kernel SHAP of each image: its coalitions' model outputs (rows of all images in shared model
        calls, :class:`_RowQueue`), more of them for nsamples auto (:meth:`_sample_more`), then the
        regressions on the CPU (:meth:`_regressions`)."""
        ctx = self.context
        targets = as_targets(targets)
        model = ctx.model
        device = images.device
        if images.dim() != 4 or images.shape[1] != len(ctx.mean) or images.shape[1] != len(ctx.std):
            raise ValueError(f"the kernel explainer needs (N, C, H, W) images with C = {len(ctx.mean)} "
                             f"channels; got {tuple(images.shape)}")
        n_images = images.shape[0]
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")
        self._check_layer()
        size = max(1, int(ctx.batch_size))
        pixels = masking.to_pixels(images, ctx.mean, ctx.std)  # the one device -> host copy before the model calls

        with torch.no_grad():
            raw = _utils.forward_in_chunks(model, images, size)
            selection = targets.select(raw)
            fx_dev = targets.explained(raw, selection.classes)
            # Rows of all images, in order: each image's all-hidden row, then its coalitions. They are
            # evaluated in model calls of `size` rows (a call can span images). Image i+1 is prepared
            # on the CPU (SLIC, sampling) while the model calls of image i run on the device; nothing
            # waits for the device until the end.
            queue = _RowQueue(model, images, targets, selection.classes)
            for i in range(n_images):
                item = self._prepare(pixels[i], seeds[i], device, images.dtype)
                queue.add(item, 0, item.rows_dev.shape[0])
                while queue.rows >= (call := autobatch.call_size(ctx)):
                    with autobatch.timed_call(ctx, call):  # CPU auto: the first calls are timed
                        queue.evaluate(call)
            queue.rest()
            fx = fx_dev.double().cpu().numpy()
            if self.settings.nsamples == "auto":
                self._sample_more(queue, fx, images.shape[1], size, device)
            y_dev = [torch.cat(item.outputs) for item in queue.prepared]
        return self._regressions(queue.prepared, y_dev, fx, selection, images.shape)

    def _sample_more(self, queue: "_RowQueue", fx: np.ndarray, channels: int, size: int,
                     device: torch.device) -> None:
        """nsamples auto: more coalitions, in rounds, for the images below the target stability."""
        settings: Settings = self.settings  # type: ignore[assignment]
        active = list(range(len(queue.prepared)))
        while active:
            still = []
            for i in active:
                item = queue.prepared[i]
                y = torch.cat(item.outputs).cpu().numpy()
                _, _, reached = self._convergence(item, y[1:], fx[i], y[0], channels)
                reached = reached[np.isfinite(reached)]
                if item.sampler is None or item.sampler.complete:
                    continue
                if self._estimable(item) and (reached.size == 0 or reached.min() >= settings.target_stability):
                    continue
                count = min(item.masks.shape[0], int(settings.max_nsamples) - item.masks.shape[0])
                added = item.sampler.draw(count) if count > 0 else 0
                if added == 0:
                    item.capped = count <= 0
                    continue
                item.masks, item.weights = item.sampler.masks, item.sampler.weights
                item.rows_dev = _to_device(item.masks[-added:], device)
                queue.add(item, 0, added, index=i)
                still.append(i)
            queue.flush(size)
            active = still

    def _regressions(self, prepared: list[_Image], y_dev: list[torch.Tensor], fx: np.ndarray, selection: Any,
                     shape: Sequence[int]) -> Attribution:
        """One transfer back, then each image's regression on the CPU (float64), painted on its players."""
        y_all = [y.cpu().numpy() for y in y_dev]
        n_images, channels, height, width = shape
        k = selection.classes.shape[1]
        values = np.empty((n_images, k, channels, height, width), dtype=np.float32)
        shap_sum = np.empty((n_images, k), dtype=np.float64)
        base_values = np.empty((n_images, k), dtype=np.float64)
        stability = np.full((n_images, k), np.nan)
        value_std = np.zeros((n_images, k, height, width), dtype=np.float32)
        for i, item in enumerate(prepared):
            fnull, y = y_all[i][0], y_all[i][1:]
            phi, std, stability[i] = self._convergence(item, y, fx[i], fnull, channels)
            value_std[i] = std.T[:, item.labels]
            values[i] = masking.paint(phi, item.labels, channels)
            shap_sum[i] = phi.sum(0)
            base_values[i] = fnull

        return Attribution(
            values=values,
            **selection.attribution_fields(),
            outputs=fx.astype(np.float32),
            base_values=base_values.astype(np.float32),
            shap_sum=shap_sum.astype(np.float32),
            segments=np.stack([item.labels for item in prepared]),
            stability=stability,
            value_std=value_std,
            nsamples_used=np.array([item.masks.shape[0] for item in prepared], dtype=np.int64),
            nsamples_capped=np.array([item.capped for item in prepared]) if self.settings.nsamples == "auto" else None,
        )

    def _convergence(self, item: _Image, y: np.ndarray, fx: np.ndarray, fnull: np.ndarray,
                     channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An image's values phi (M, k), their estimated standard deviations (M, k; Covert & Lee,
        :func:`value_covariance`) and the (k,) stability of its maps, estimated as
        ``stability_from`` says. Exact values (every coalition enumerated) have std 0 and stability
        1; NaN stability where it cannot be estimated (a constant map, too few draws to split)."""
        k = fx.shape[0]
        if item.masks.shape[0] == 0:  # a single superpixel: exact
            return (fx - fnull)[None, :], np.zeros((1, k)), np.ones(k)
        phi = solve(item.masks, item.weights, y, fx, fnull)
        if item.nfixed == item.masks.shape[0]:
            return phi, np.zeros_like(phi), np.ones(k)
        units = item.sampler.unit_array()
        cov = value_covariance(item.masks, item.weights, y, fx, fnull, phi, units)
        std = np.sqrt(np.maximum(np.einsum("kii->ik", cov), 0.0))
        if units.shape[0] < 2 or not self._estimable(item):
            # one draw has no spread, and with no more draws than free values the fit leaves no residual:
            # the error is unknown (NaN, blank in the report), not zero (which says exact)
            std = np.full_like(phi, np.nan)
        settings: Settings = self.settings  # type: ignore[assignment]
        if settings.stability_from == "variance":
            stability = variance_stability(phi, cov, item.labels) if self._estimable(item) else np.full(k, np.nan)
            return phi, std, stability
        return phi, std, self._split_half_stability(item, y, fx, fnull, channels)

    @staticmethod
    def _estimable(item: _Image) -> bool:
        """Enough draws for the variance estimate: more than the M - 1 free values (every estimate is
        fine for split-half, which reports NaN itself when it cannot split)."""
        sampler = item.sampler
        return sampler is None or sampler.complete or sum(unit[2] for unit in sampler.units) >= sampler.m

    @staticmethod
    def _split_half_stability(item: _Image, y: np.ndarray, fx: np.ndarray, fnull: np.ndarray,
                              channels: int) -> np.ndarray:
        """(k,) split-half reliability over the drawn coalitions (see :func:`split_half`), NaN when
        too few were drawn to split."""
        k = fx.shape[0]
        halves = split_half(item.masks, item.weights, item.nfixed)
        if halves is None:
            return np.full(k, np.nan)
        maps = [torch.from_numpy(masking.paint(solve(item.masks, w, y, fx, fnull), item.labels, channels))[None]
                for w in halves]
        sizes = tuple(int((w[item.nfixed:] > 0).sum()) for w in halves)
        return split_half_stability(maps[0], maps[1], sizes)[0]
