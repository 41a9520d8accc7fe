"""Split-half stability of a map: how far a rerun at another seed would agree with it.

Explainers with random draws (gradient's samples, deep's background, kernel's coalitions) keep the
sums of two halves of their draws apart; the Pearson correlation of the two half-maps, Spearman-Brown
corrected, estimates the correlation of the map with a rerun. Here (not in metrics) so that the
explainers and the metrics both import it without an import circle.
"""

from __future__ import annotations

import numpy as np


def spearman_brown(r: np.ndarray, sizes: tuple[int, int] | None = None) -> np.ndarray:
    """The reliability of the whole from the correlation ``r`` of its two halves.

    Equal halves: ``2r / (1 + r)``. Halves of ``n1`` and ``n2`` draws (odd nsamples, an odd
    background): the same model (map = truth + noise whose variance falls as 1/draws) solved for
    the noise-to-signal ratio ``q`` from ``r^2 (1 + q/n1)(1 + q/n2) = 1``, then ``1 / (1 + q/(n1+n2))``;
    for ``n1 == n2`` this is exactly ``2r / (1 + r)``. A non-positive ``r`` is kept as it is (the map
    is noise).
    """
    r = np.asarray(r, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if sizes is None or sizes[0] == sizes[1]:
            return np.where(r > 0, 2 * r / (1 + r), r)
        n1, n2 = float(sizes[0]), float(sizes[1])
        r2 = r * r
        a, b, c = r2 / (n1 * n2), r2 * (1 / n1 + 1 / n2), r2 - 1
        q = np.where(a > 0, (-b + np.sqrt(np.maximum(b * b - 4 * a * c, 0))) / (2 * np.where(a > 0, a, 1)), np.inf)
        return np.where(r > 0, 1 / (1 + q / (n1 + n2)), r)


def split_half_stability(half_a: "torch.Tensor", half_b: "torch.Tensor",  # noqa: F821
                         sizes: tuple[int, int] | None = None) -> np.ndarray:
    """(N, k) stability from two (N, k, C, H, W) maps of the two halves (any positive scale each).

    Pearson correlation over the pixels of the channel-summed maps, Spearman-Brown corrected
    (``sizes``: the draws in each half, when they differ); NaN where a half-map is constant (no
    correlation is defined).
    """
    a = half_a.double().sum(2).flatten(2)
    b = half_b.double().sum(2).flatten(2)
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denom = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    r = ((a * b).sum(-1) / denom).cpu().numpy()
    r = np.where(denom.cpu().numpy() > 0, np.clip(r, -1.0, 1.0), np.nan)
    return spearman_brown(r, sizes)
