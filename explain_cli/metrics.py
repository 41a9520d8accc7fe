"""How far to trust a map: faithfulness (deletion/insertion AUC) and stability (split-half reliability).

**Faithfulness** (``metrics: [deletion, insertion]``), as the RISE paper (Petsiuk et al. 2018)
defines it. For an image, a class and its map, the pixels are ranked by the map (summed over
channels; a layer map is upsampled to the input the way the overlay shows it, nearest; a superpixel
map ranks its superpixels, whose pixels stay together in the order). In ``metrics_steps`` steps the
most-attributed pixels are

* **deleted**: replaced by the baseline image (a box blur of the image by default, built by
  ``masking.fill_images`` like the masking explainers' fills), so the curve starts at the image and
  ends at the baseline; a faithful map makes the class's probability fall fast: *lower* deletion
  AUC is better;
* **inserted**: copied from the image onto the baseline image, so the curve starts at the baseline
  and ends at the image; a faithful map makes the probability rise fast: *higher* is better.

Step ``t`` changes the first ``round(t * H * W / steps)`` pixels of the order; the curve is the
class's softmax probability at ``t = 0..steps`` and the AUC its trapezoid integral over ``x = t /
steps`` in [0, 1]. The same two AUCs are computed for a random pixel order (seeded from the image
seed) on the same images and classes: the reference that says what "better than random" means.

Cost: per image ``2 + len(metrics) * (k + 1) * (steps - 1)`` model evaluations (the image and the
baseline once; each intermediate step of each order: the k classes' orders and the random one, whose
one forward pass serves all k classes), in model batches of ``batch_size`` rows that span images,
built on the model's device.

**Stability** (always on for gradient, deep and kernel; blank for partition, which is deterministic):
the Pearson correlation, over pixels of the channel-summed map in the explained space, between the
maps estimated from two halves of the explainer's random draws, Spearman-Brown corrected
(``2r / (1 + r)``): an estimate of the correlation of the map with a rerun at another seed (another
background set for deep). Nothing is re-evaluated: the explainers keep the two halves' sums apart
(``explain_cli.stability``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np

METRICS = ("deletion", "insertion")
DEFAULT_BASELINE = "blur(32,32)"


# -- ranking ---------------------------------------------------------------------------------------

def saliency(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(k, C, h, w) attributions -> (k, H, W) channel-summed map on the input grid (nearest, as drawn)."""
    from explain_cli.render import channel_map

    return channel_map(values, size).astype(np.float64)


def pixel_ranks(score: np.ndarray, segments: np.ndarray | None = None) -> np.ndarray:
    """Rank of every pixel of an (H, W) score map, 0 = most attributed (flattened, int64).

    With a superpixel label map the superpixels are ranked by their mean score and each keeps its
    pixels together in the order; ties go to the lower pixel (or superpixel) index.
    """
    flat = np.asarray(score, np.float64).reshape(-1)
    index = np.arange(flat.size)
    if segments is None:
        order = np.lexsort((index, -flat))
    else:
        labels = np.asarray(segments).reshape(-1)
        counts = np.bincount(labels)
        seg_mean = np.bincount(labels, weights=flat) / np.maximum(counts, 1)
        order = np.lexsort((index, labels, -seg_mean[labels]))
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = index
    return ranks


def random_ranks(seed: int, pixels: int) -> np.ndarray:
    """A random pixel order (as ranks) drawn only from the image's seed."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % 2**64, 0x3E7A1C]))
    return rng.permutation(pixels).astype(np.int64)


def step_counts(steps: int, pixels: int) -> np.ndarray:
    """Pixels changed at step t = 0..steps: round(t * pixels / steps)."""
    return np.rint(np.arange(steps + 1) * pixels / steps).astype(np.int64)


def auc(curve: np.ndarray) -> np.ndarray:
    """Trapezoid area under curves sampled at x = 0, 1/T, ..., 1 (last axis), as RISE's ``auc``."""
    c = np.asarray(curve, np.float64)
    return (c.sum(-1) - (c[..., 0] + c[..., -1]) / 2) / (c.shape[-1] - 1)


# -- faithfulness ----------------------------------------------------------------------------------

@dataclass
class Faithfulness:
    """AUCs of a batch, (N, k) each, ``None`` for a metric not asked for.

    ``random_*`` are the same AUCs with a random pixel order (one per image) for the same classes.
    ``evaluations`` counts the model evaluations (rows) spent.
    """

    deletion: np.ndarray | None
    insertion: np.ndarray | None
    random_deletion: np.ndarray | None
    random_insertion: np.ndarray | None
    evaluations: int


def evaluations_per_image(metrics: Sequence[str], steps: int, k: int) -> int:
    return 2 + len(metrics) * (k + 1) * (steps - 1)


def faithfulness(model: "torch.nn.Module", images: "torch.Tensor", values: np.ndarray,  # noqa: F821
                 classes: np.ndarray, seeds: Sequence[int], metrics: Sequence[str], steps: int,
                 baseline: Union[str, list[float]], mean: Sequence[float], std: Sequence[float],
                 batch_size: int, segments: np.ndarray | None = None,
                 activation: str = "softmax") -> Faithfulness:
    """Deletion/insertion AUCs of the maps ``values`` (N, k, C, h, w) for ``classes`` (N, k).

    The curves read each class's probability under ``activation`` (softmax, or sigmoid for a
    one-logit or multi-label model: ``targets.activation``).

    ``images`` (N, C, H, W) are the preprocessed images on the model's device; see the module
    docstring for the definitions.
    """
    import torch

    from explain_cli import masking
    from explain_cli.explainers import _utils

    metrics = [m for m in METRICS if m in metrics]
    n_images, _, height, width = images.shape
    k = classes.shape[1]
    if not metrics or n_images == 0:
        return Faithfulness(None, None, None, None, 0)
    device = images.device
    hw = height * width

    ranks = np.empty((n_images, k + 1, hw), dtype=np.int64)
    for i in range(n_images):
        maps = saliency(values[i], (height, width))
        seg = None if segments is None else segments[i]
        for r in range(k):
            ranks[i, r] = pixel_ranks(maps[r], seg)
        ranks[i, k] = random_ranks(seeds[i], hw)
    counts = step_counts(steps, hw)

    # Rows: per image its unchanged image and its baseline, then (order, metric, step 1..steps-1).
    inner = steps - 1
    per_image = evaluations_per_image(metrics, steps, k)
    o, m, t = np.meshgrid(np.arange(k + 1), np.arange(len(metrics)), np.arange(1, steps), indexing="ij")
    row_order = np.concatenate([[0, 0], o.reshape(-1)])
    row_deleting = np.concatenate([[True, True], np.asarray([x == "deletion" for x in metrics])[m.reshape(-1)]])
    row_changed = np.concatenate([[0, hw], counts[t.reshape(-1)]])
    img = np.repeat(np.arange(n_images), per_image)
    order = np.tile(row_order, n_images)
    deleting = np.tile(row_deleting, n_images)
    changed = np.tile(row_changed, n_images)

    ranks_dev = torch.from_numpy(ranks.astype(np.int32)).to(device)
    base_dev = masking.fill_images(images, baseline, mean, std)
    classes_dev = torch.from_numpy(np.asarray(classes, np.int64)).to(device)
    img_dev = torch.from_numpy(img).to(device)
    order_dev = torch.from_numpy(order).to(device)
    deleting_dev = torch.from_numpy(deleting).to(device)
    changed_dev = torch.from_numpy(changed.astype(np.int32)).to(device)

    probs = []
    size = max(1, int(batch_size))
    with torch.no_grad(), _utils.frozen_parameters(model):
        for a, b in _utils.chunk_ranges(img.shape[0], size):
            rows_img = img_dev[a:b]
            affected = ranks_dev[rows_img, order_dev[a:b]] < changed_dev[a:b, None]  # (rows, H*W)
            keep_image = (affected ^ deleting_dev[a:b, None]).view(b - a, 1, height, width)
            batch = torch.where(keep_image, images[rows_img], base_dev[rows_img])
            out = _utils.as_2d(model(batch))
            if activation == "binary":  # one sigmoid output, two named classes: 0 = negative, 1 = positive
                out = torch.cat([-out, out], dim=1)
            if activation in ("sigmoid", "binary"):
                probs.append(torch.sigmoid(out.float().gather(1, classes_dev[rows_img])))
            else:
                probs.append(torch.softmax(out.float(), dim=1).gather(1, classes_dev[rows_img]))
    p = torch.cat(probs).double().cpu().numpy().reshape(n_images, per_image, k)

    full, empty = p[:, 0], p[:, 1]  # (N, k): the image, the baseline
    inner_p = p[:, 2:].reshape(n_images, k + 1, len(metrics), inner, k)
    results: dict[str, np.ndarray] = {}
    for mi, name in enumerate(metrics):
        start, end = (full, empty) if name == "deletion" else (empty, full)
        curves = np.empty((n_images, k + 1, k, steps + 1))  # (image, order, class, step)
        curves[..., 0] = start[:, None, :]
        curves[..., -1] = end[:, None, :]
        curves[..., 1:-1] = np.moveaxis(inner_p[:, :, mi], -2, -1)
        areas = auc(curves)  # (N, k + 1, k)
        results[name] = areas[:, np.arange(k), np.arange(k)]  # order r scores class r
        results["random_" + name] = areas[:, k, :]
    return Faithfulness(results.get("deletion"), results.get("insertion"), results.get("random_deletion"),
                        results.get("random_insertion"), int(img.shape[0]))


# -- per run ---------------------------------------------------------------------------------------

UNSTABLE = 0.5  # the run warns when its median stability is below this


class RunMetrics:
    """Scores each explained batch and keeps the run's totals for run.json's ``metrics`` entry."""

    def __init__(self, names: Sequence[str], steps: int, baseline: Union[str, list[float]],
                 activation: str = "softmax") -> None:
        self.names = [m for m in METRICS if m in names]
        self.activation = activation
        self.steps = int(steps)
        self.baseline = baseline
        self.evaluations = 0
        self.rows = 0
        self.sums = {key: 0.0 for key in ("deletion", "insertion", "random_deletion", "random_insertion")}
        self.stabilities: list[float] = []

    def score(self, model: "torch.nn.Module", images: "torch.Tensor | None", attribution: Any,  # noqa: F821
              seeds: Sequence[int], mean: Sequence[float], std: Sequence[float], batch_size: int) -> None:
        """Fill ``attribution.deletion_auc``/``insertion_auc`` (when asked; ``images`` may be None
        otherwise) and add to the totals."""
        # padding slots (images asked fewer classes than others in the batch) are not counted
        valid = np.ones(np.shape(attribution.classes), bool) if attribution.valid is None \
            else np.asarray(attribution.valid, bool)
        if attribution.stability is not None:
            self.stabilities.extend(float(s) for s in np.asarray(attribution.stability)[valid]
                                    if np.isfinite(s))
        if not self.names:
            return
        result = faithfulness(model, images, attribution.values, attribution.classes, seeds, self.names,
                              self.steps, self.baseline, mean, std, batch_size, attribution.segments,
                              self.activation)
        attribution.deletion_auc = result.deletion
        attribution.insertion_auc = result.insertion
        self.evaluations += result.evaluations
        self.rows += int(valid.sum())
        for key in self.sums:
            value = getattr(result, key)
            if value is not None:
                self.sums[key] += float(np.sum(np.asarray(value)[valid]))

    def median_stability(self) -> float | None:
        return float(np.median(self.stabilities)) if self.stabilities else None

    def summary(self) -> dict[str, Any]:
        """run.json's ``metrics``: means over the (image, class) rows scored by this run."""
        def mean(key: str) -> float | None:
            name = key.replace("random_", "")
            if name not in self.names or not self.rows:
                return None
            return round(self.sums[key] / self.rows, 6)

        median = self.median_stability()
        return {
            "computed": list(self.names), "steps": self.steps,
            "baseline": self.baseline if self.names else None,
            "model_evaluations": self.evaluations, "rows": self.rows,
            "mean": {"deletion_auc": mean("deletion"), "insertion_auc": mean("insertion")},
            "random_reference": {"deletion_auc": mean("random_deletion"),
                                 "insertion_auc": mean("random_insertion")},
            "stability_median": None if median is None else round(median, 6),
            "stability_rows": len(self.stabilities),
        }


def merge_summaries(parts: Sequence[dict[str, Any] | None], stabilities: Sequence[float]) -> dict[str, Any] | None:
    """Combine the shards' ``metrics`` entries (means weighted by their rows); the stability median
    comes from the merged CSV's ``stability`` column."""
    parts = [p for p in parts if isinstance(p, dict)]
    if not parts:
        return None
    rows = sum(int(p.get("rows") or 0) for p in parts)

    def weighted(section: str, key: str) -> float | None:
        pairs = [((p.get(section) or {}).get(key), int(p.get("rows") or 0)) for p in parts]
        pairs = [(v, n) for v, n in pairs if isinstance(v, (int, float)) and n]
        total = sum(n for _, n in pairs)
        return round(sum(v * n for v, n in pairs) / total, 6) if total else None

    values = [s for s in stabilities if np.isfinite(s)]
    return {
        "computed": parts[0].get("computed", []), "steps": parts[0].get("steps"),
        "baseline": parts[0].get("baseline"),
        "model_evaluations": sum(int(p.get("model_evaluations") or 0) for p in parts), "rows": rows,
        "mean": {k: weighted("mean", k) for k in ("deletion_auc", "insertion_auc")},
        "random_reference": {k: weighted("random_reference", k) for k in ("deletion_auc", "insertion_auc")},
        "stability_median": round(float(np.median(values)), 6) if values else None,
        "stability_rows": len(values),
    }
