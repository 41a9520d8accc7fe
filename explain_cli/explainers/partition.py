"""Partition SHAP (Owen values) with ``shap.maskers.Image`` masking, batched over images.

This computes the same quantity as::

    masker = shap.maskers.Image(mask, (H, W, C))          # mask: inpaint_telea | inpaint_ns | blur(kx,ky) | value
    explainer = shap.Explainer(f, masker)                  # -> shap.PartitionExplainer
    explainer(x_hwc_0_255, max_evals=max_evals, batch_size=batch_size,
              outputs=shap.Explanation.argsort.flip[:k])

where ``f`` takes NHWC images on the 0-255 scale, normalises them with the run's mean/std and calls
the model. The definitions are shap's (``shap/explainers/_partition.py``: ``explain_row``, ``owen``
and ``lower_credit``; ``shap/maskers/_image.py``: ``Image``), not a variant of ours:

**Features and the partition tree.** The features are the ``H * W * C`` pixel-channels. The tree is
shap's axis-aligned halving: a box of rows x columns x channels is split in two along the rows when
they are at least as many as the columns (and more than one), else along the columns, and along the
channels only once it is a single pixel. shap builds it in mirrored coordinates (its leaves are
numbered backwards), so in image coordinates the *left* child is the half with the higher indices
(lower rows, right-hand columns, later channels) and, for an odd width, the *right* child (lower
indices) is the larger one; we build exactly that tree (see ``_build_tree``). Leaves are single
pixel-channels.

**Masking, in pixel space.** The explainer receives normalised NCHW tensors ``x``. It recovers the
8-bit image the pipeline decoded as ``p = clip(round((x * std + mean) * 255), 0, 255)`` (exact for
images the pipeline produced; any other input is quantised to 8 bits first, and ``f(x)`` then refers
to the quantised image). A mask reveals a set of pixel-channels; the masked image is, in pixel space:

* ``blur(KX,KY)``: ``where(revealed, p, cv2.blur(p, (KX, KY)))`` -- the box blur of the whole image
  (``KX`` horizontal, ``KY`` vertical, OpenCV's default reflect-101 border), channel by channel;
* a constant (``128`` for grey, or ``[r, g, b]``, 0-255): ``where(revealed, p, colour)``;
* ``inpaint_telea`` / ``inpaint_ns``: a *pixel* is hidden when any of its channels is hidden, and
  the hidden pixels are filled by ``cv2.inpaint(p, hidden, inpaintRadius=3, flags)`` (all channels of
  a hidden pixel come from the inpainting); when every pixel is hidden the image becomes its mean
  colour (shap's special case, since there is nothing to inpaint from).

The masked image is normalised again (``(m / 255 - mean) / std``) and given to the model.

**The Owen expansion under the budget** (``fixed_context=None``, shap's default). ``f00`` is the
output of the fully masked image (the base value), ``f11`` of the image itself; the top-k classes
are ranked on ``f11`` (descending, like ``outputs=shap.Explanation.argsort.flip[:k]``). A priority
queue starts with the root ``(m00 = nothing revealed, f00, f11, weight 1)``. Each round pops entries
(largest priority first) until ``batch_size`` masks are collected or the budget would be passed
(``eval_count + masks < max_evals - 2``; 2 evaluations went to ``f00`` and ``f11``; a pair can
overshoot by one, as in shap). A popped leaf adds ``(f11 - f00) * w`` to itself; a popped internal
node with children ``L``, ``R`` asks for ``f10 = f(m00 + L)`` and ``f01 = f(m00 + R)`` and, once the
round is evaluated, pushes four entries with weight ``w / 2``: ``(m00, f00, f10, L)``,
``(m00, f00, f01, R)``, ``(m00 + R, f01, f11, L)`` and ``(m00 + L, f10, f11, R)``, each with priority
``max_k |f_hi - f_lo| * w / 2``. When the budget is spent, every entry still queued adds
``(f11 - f00) * w`` to its node. Finally each internal node's value is passed down to its children in
proportion to their sizes (shap's ``lower_credit``), so a coarse region that was never split spreads
its credit evenly over its pixel-channels. The values telescope: their sum is exactly
``f(x) - f(fully masked)`` up to float rounding (``shap_sum``, ``outputs`` and ``base_values``).

The values are returned per pixel-channel as ``(N, k, C, H, W)`` (shap's ``(H, W, C, k)``
transposed). The ``background`` of the run is not used: the masker defines what "absent" means.

How it is computed (this is what makes it fast):

* every image has its own queue, but the expansions of all images of a step advance together,
  round by round: the masks of one round of every image are evaluated in model calls of
  ``context.batch_size`` rows (a call can span several images); the rounds of an image are exactly
  shap's, so an image's values do not depend on which images share its step;
* blur and constant fills are computed once per image; a batch of masked images is built on the
  model's device as ``where(revealed, p, filled)``, the revealed sets coming from the tree's boxes
  (a mask is stored as the few tree nodes it reveals, not as an ``H*W*C`` array);
* inpainting depends on the mask, so it is done per mask (``cv2.inpaint``, as shap) in a thread pool
  (OpenCV releases the GIL); all inpaintings of a round are queued at once and each model call runs
  as soon as its rows are ready, so inpainting overlaps the model;
* the queue bookkeeping is done in float64 on the model outputs, like shap.

Differences from shap that remain: shap breaks exact ties between queue priorities with
``np.random.randn()`` (the global NumPy generator); we break them by insertion order, so the result
is deterministic (``seeds`` are ignored). Exact ties only arise between entries with identical
output differences (e.g. the channel-level splits of an inpainted pixel, whose halves change
nothing); shap's ``argsort`` breaks ties between exactly equal class scores differently from our
stable sort. Model outputs are float32 and may differ in the last bits with the batch composition.
"""

from __future__ import annotations

import heapq
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, Sequence, Union

import numpy as np
import torch
from pydantic import Field, field_validator

from explain_cli import masking
from explain_cli.errors import ConfigError
from explain_cli.explainers import _utils
from explain_cli.explainers import base
from explain_cli.explainers.base import Attribution, ExplainerSettings
from explain_cli.targets import BatchTargets, as_targets

class Settings(ExplainerSettings):
    """``explainer.*`` keys of the partition (Owen values, shap's PartitionExplainer) explainer."""

    name: Literal["partition"] = "partition"
    mask: Union[str, float, list[float]] = Field(
        "inpaint_telea",
        description="how hidden pixels are filled (shap.maskers.Image): inpaint_telea | inpaint_ns | "
                    "blur(KX,KY) | a grey level 0-255 | [r, g, b] 0-255")
    max_evals: int = Field(500, ge=2, le=1_000_000, description="model evaluations per image (shap's max_evals).")
    batch_size: int = Field(
        50, ge=1, le=10_000, description="masks per image per round of the Owen expansion (shap's batch_size; "
                              "the order of the expansion depends on it). Rows per model call are the "
                              "top-level batch_size.")

    @field_validator("mask", mode="before")
    @classmethod
    def _check_mask(cls, value: Any) -> Union[str, float, list[float]]:
        return masking.parse_mask(value)


# -- the partition tree -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Tree:
    """shap.maskers.Image's partition tree of an (H, W, C) image.

    Node ids: leaves are the flat (row-major H, W, C) pixel-channel indices ``0..M-1``; internal
    nodes are ``M..2M-2`` (the root is ``2M-2``, as in shap). ``boxes`` are in image coordinates and
    have one extra all-empty row at index ``2M-1`` used for padding.
    """

    shape: tuple[int, int, int]
    n_leaves: int
    root: int
    boxes: np.ndarray  # (2M, 6) int64: x0, x1, y0, y1, z0, z1 per node (+ an empty box)
    left: np.ndarray  # (2M-1,) int64, -1 for leaves
    right: np.ndarray
    size: np.ndarray  # (2M-1,) leaves under each node
    levels: tuple[np.ndarray, ...]  # internal node ids, level by level from the root

    @property
    def pad(self) -> int:
        return 2 * self.n_leaves - 1


@lru_cache(maxsize=4)
def _build_tree(shape: tuple[int, int, int]) -> _Tree:
    """shap.maskers.Image's partition tree (``_jit_build_partition_tree``), built level by level.

    shap halves boxes in "builder" coordinates (the lower half ``[start, start + width // 2)`` is the
    left child) but numbers the leaves backwards: the builder's pixel-channel with flat index ``q``
    becomes leaf (= mask column = image position) ``M - 1 - q``. Reversing the flat index flips all
    three axes, so in image coordinates a builder box ``[x0, x1)`` is ``[H - x1, H - x0)`` (and the
    same for columns and channels): the left child holds the higher indices, and for an odd width the
    right child (lower indices) is the larger. We store the boxes in image coordinates.
    """
    h, w, c = shape
    m = h * w * c
    n_nodes = 2 * m - 1
    boxes = np.zeros((n_nodes + 1, 6), dtype=np.int64)
    left = np.full(n_nodes, -1, dtype=np.int64)
    right = np.full(n_nodes, -1, dtype=np.int64)
    size = np.ones(n_nodes, dtype=np.int64)
    extent = np.array([h, h, w, w, c, c], dtype=np.int64)

    def to_image(builder: np.ndarray) -> np.ndarray:
        return extent - builder[:, [1, 0, 3, 2, 5, 4]]

    root = n_nodes - 1 if m > 1 else 0
    cur = np.array([[0, h, 0, w, 0, c]], dtype=np.int64)  # builder coordinates
    boxes[root] = to_image(cur)[0]
    size[root] = m
    levels = []
    cur_ids = np.array([root] if m > 1 else [], dtype=np.int64)
    next_id = root - 1
    while len(cur_ids):
        levels.append(cur_ids)
        xw, yw, zw = cur[:, 1] - cur[:, 0], cur[:, 3] - cur[:, 2], cur[:, 5] - cur[:, 4]
        split_x = (xw >= yw) & (xw > 1)
        split_y = ~split_x & (yw > 1)
        split_z = ~split_x & ~split_y
        lo, hi = cur.copy(), cur.copy()
        for axis, split, width in ((0, split_x, xw), (1, split_y, yw), (2, split_z, zw)):
            mid = cur[:, 2 * axis] + width // 2
            lo[split, 2 * axis + 1] = mid[split]
            hi[split, 2 * axis] = mid[split]
        children = np.stack([lo, hi], axis=1).reshape(-1, 6)  # left, right, left, right, ...
        sizes = (children[:, 1] - children[:, 0]) * (children[:, 3] - children[:, 2]) * (children[:, 5] - children[:, 4])
        is_leaf = sizes == 1
        ids = np.empty(len(children), dtype=np.int64)
        ids[is_leaf] = m - 1 - (children[is_leaf, 0] * w * c + children[is_leaf, 2] * c + children[is_leaf, 4])
        n_internal = int((~is_leaf).sum())
        ids[~is_leaf] = np.arange(next_id, next_id - n_internal, -1, dtype=np.int64)
        next_id -= n_internal
        boxes[ids] = to_image(children)
        size[ids] = sizes
        left[cur_ids] = ids[0::2]
        right[cur_ids] = ids[1::2]
        cur_ids = ids[~is_leaf]
        cur = children[~is_leaf]
    assert next_id == m - 1, "partition tree has an unexpected number of nodes"
    return _Tree(shape, m, root, boxes, left, right, size, tuple(levels))


def _lower_credit(tree: _Tree, dvalues: np.ndarray) -> np.ndarray:
    """shap's ``lower_credit``, vectorised level by level: (N, nodes, k) -> (N, nodes, k).

    Each child ends with its own value plus ``parent * child_size / parent_size`` (same float64
    operations as shap's recursion).
    """
    values = dvalues.copy()
    for ids in tree.levels:
        parent = values[:, ids]
        group = tree.size[ids][None, :, None]
        for child in (tree.left[ids], tree.right[ids]):
            values[:, child] += parent * tree.size[child][None, :, None] / group
    return values


# -- the Owen expansion of one image ----------------------------------------------------------


class _Owen:
    """shap's ``PartitionExplainer.owen`` (fixed_context=None) for one image, one round at a time.

    A mask is the tuple of tree nodes it reveals (their boxes are disjoint).
    """

    def __init__(self, tree: _Tree, f00: np.ndarray, f11: np.ndarray, max_evals: int, batch_size: int) -> None:
        self.tree = tree
        self.max_evals = max_evals - 2  # f00 and f11 are the first two evaluations
        self.batch_size = batch_size
        self.dvalues = np.zeros((2 * tree.n_leaves - 1, len(f00)), dtype=np.float64)
        self.eval_count = 0
        self._counter = 1
        self._queue: list = [(0.0, 0, ((), f00, f11, tree.root, 1.0))]
        self._pending: list = []
        self.done = False

    def _push(self, f_lo: np.ndarray, f_hi: np.ndarray, weight: float, args: tuple) -> None:
        heapq.heappush(self._queue, (-np.max(np.abs(f_hi - f_lo)) * weight, self._counter, args))
        self._counter += 1

    def next_masks(self) -> list[tuple[int, ...]]:
        """The masks of the next round (empty when the expansion is finished)."""
        if self.done:
            return []
        q, tree = self._queue, self.tree
        if q and self.eval_count >= self.max_evals:
            # Out of budget: everything still queued stays on its (internal) node.
            while q:
                _, _, (_, f00, f11, ind, weight) = heapq.heappop(q)
                self.dvalues[ind] += (f11 - f00) * weight
        batch, masks = [], []
        while q and len(masks) < self.batch_size and self.eval_count + len(masks) < self.max_evals:
            _, _, (m00, f00, f11, ind, weight) = heapq.heappop(q)
            if ind < tree.n_leaves:
                self.dvalues[ind] += (f11 - f00) * weight
                continue
            lind, rind = int(tree.left[ind]), int(tree.right[ind])
            m10, m01 = m00 + (lind,), m00 + (rind,)
            batch.append((m00, m10, m01, f00, f11, lind, rind, weight))
            masks.append(m10)
            masks.append(m01)
        self._pending = batch
        if not batch:
            self.done = True
        return masks

    def absorb(self, fout: np.ndarray) -> None:
        """Model outputs (float64, (masks, k)) of the masks returned by :meth:`next_masks`."""
        self.eval_count += len(fout)
        for i, (m00, m10, m01, f00, f11, lind, rind, weight) in enumerate(self._pending):
            f10, f01 = fout[2 * i], fout[2 * i + 1]
            new_weight = weight / 2
            self._push(f00, f10, new_weight, (m00, f00, f10, lind, new_weight))
            self._push(f00, f01, new_weight, (m00, f00, f01, rind, new_weight))
            self._push(f01, f11, new_weight, (m01, f01, f11, lind, new_weight))
            self._push(f10, f11, new_weight, (m10, f10, f11, rind, new_weight))
        self._pending = []


# -- maskers: masked pixel images for a list of (image, revealed nodes) rows ----------------------


Row = tuple[int, tuple[int, ...]]


class _FillMasker:
    """Blur and constant colour: ``where(revealed, p, filled)``, built on the device.

    Normalisation is elementwise, so it is applied once per image to ``p`` and to ``filled``
    (``norm(where(r, p, f)) == where(r, norm(p), norm(f))`` exactly) instead of once per mask.
    """

    def __init__(self, tree: _Tree, inputs: torch.Tensor, filled: torch.Tensor) -> None:
        self.tree = tree
        self.inputs = inputs  # (N, C, H, W) normalised image, model dtype
        self.filled = filled  # (N, C, H, W) normalised fill, model dtype
        device = inputs.device
        h, w, c = tree.shape
        self._ar = [torch.arange(n, device=device) for n in (h, w, c)]

    def prepare(self, rows: Sequence[Row]) -> list:
        return list(rows)

    def revealed(self, rows: Sequence[Row]) -> torch.Tensor:
        """(B, C, H, W) bool: which pixel-channels each row reveals (a union of disjoint boxes)."""
        h, w, c = self.tree.shape
        slots = max(1, max(len(nodes) for _, nodes in rows))
        ids = np.full((len(rows), slots), self.tree.pad, dtype=np.int64)
        for r, (_, nodes) in enumerate(rows):
            ids[r, :len(nodes)] = nodes
        bx = torch.from_numpy(self.tree.boxes[ids]).to(self.inputs.device)  # (B, S, 6)
        ax_h, ax_w, ax_c = self._ar
        rows_in = (ax_h >= bx[..., 0:1]) & (ax_h < bx[..., 1:2])  # (B, S, H)
        cols_in = (ax_w >= bx[..., 2:3]) & (ax_w < bx[..., 3:4])  # (B, S, W)
        chans_in = (ax_c >= bx[..., 4:5]) & (ax_c < bx[..., 5:6])  # (B, S, C)
        ch_rows = (chans_in[:, :, :, None] & rows_in[:, :, None, :]).float().reshape(len(rows), slots, c * h)
        # Sum over the boxes of the outer products: a coverage count, 0 or 1 (small integers: exact).
        cover = torch.bmm(ch_rows.transpose(1, 2), cols_in.float())  # (B, C*H, W)
        return cover.reshape(len(rows), c, h, w) > 0.5

    def batch(self, rows: Sequence[Row], items: list) -> torch.Tensor:
        revealed = self.revealed(rows)
        out = torch.empty(revealed.shape, dtype=self.inputs.dtype, device=self.inputs.device)
        start = 0
        while start < len(rows):  # rows of one image are consecutive: no per-row copies of the images
            i = rows[start][0]
            stop = start + 1
            while stop < len(rows) and rows[stop][0] == i:
                stop += 1
            torch.where(revealed[start:stop], self.inputs[i], self.filled[i], out=out[start:stop])
            start = stop
        return out


class _InpaintMasker:
    """Inpainting (per mask, on the CPU, in a thread pool) as shap.maskers.Image.inpaint."""

    def __init__(self, tree: _Tree, pixels_hwc: np.ndarray, method: str, pool: ThreadPoolExecutor,
                 normalise) -> None:
        import cv2

        self.cv2 = cv2
        self.flag = getattr(cv2, method)
        self.tree = tree
        self.pixels = pixels_hwc  # (N, H, W, C) float32, integer valued
        self.pixels_u8 = np.ascontiguousarray(pixels_hwc.astype(np.uint8))
        # shap: when every pixel is hidden the image becomes its mean colour (float32 mean).
        self.mean_images = []
        for img in pixels_hwc:
            out = img.copy()
            out[:] = out.mean((0, 1))
            self.mean_images.append(out)
        self.pool = pool
        self.normalise = normalise

    def _one(self, row: Row) -> np.ndarray:
        i, nodes = row
        h, w, c = self.tree.shape
        revealed = np.zeros((h, w, c), dtype=bool)
        for node in nodes:
            x0, x1, y0, y1, z0, z1 = self.tree.boxes[node]
            revealed[x0:x1, y0:y1, z0:z1] = True
        hidden = (~revealed.all(axis=2)).astype(np.uint8)  # a pixel is hidden if any channel is
        if hidden.all():
            return self.mean_images[i]
        if not hidden.any():
            return self.pixels[i]  # cv2.inpaint with an empty mask returns the image
        out = self.cv2.inpaint(self.pixels_u8[i], hidden, inpaintRadius=3, flags=self.flag)
        return out.astype(np.float32).reshape(h, w, c)

    def prepare(self, rows: Sequence[Row]) -> list[Future]:
        return [self.pool.submit(self._one, row) for row in rows]

    def batch(self, rows: Sequence[Row], items: list[Future]) -> torch.Tensor:
        hwc = np.stack([f.result() for f in items])
        return self.normalise(torch.from_numpy(hwc).permute(0, 3, 1, 2))


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


class Explainer(base.Explainer):
    """Owen values with shap's Image masker (shap's PartitionExplainer), batched over images."""

    name = "partition"
    input_only = True
    uses_background = False
    backward = False

    @property
    def images_per_step(self) -> int:
        """Images per explain() call: enough that one round fills at least a model batch."""
        settings: Settings = self.settings  # type: ignore[assignment]
        per_round = max(1, settings.batch_size)
        return max(8, -(-int(self.context.batch_size) // per_round))

    # -- helpers ---------------------------------------------------------------------------

    def _stats(self, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.context
        if len(ctx.mean) != channels or len(ctx.std) != channels:
            raise ValueError(f"mean/std have {len(ctx.mean)}/{len(ctx.std)} values for {channels} channels")
        mean = torch.tensor(ctx.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(ctx.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        return mean, std

    def _evaluate(self, rows: list[Row], masker, row_classes: torch.Tensor | None = None,
                  targets: BatchTargets | None = None) -> torch.Tensor:
        """Model outputs of the masked images of ``rows``, in chunks of ``context.batch_size``.

        With ``row_classes`` (rows, k) only the explained quantity of those classes is kept. The results stay on the device
        until all chunks are queued, so the device works while the next chunk is being masked.
        """
        model = self.context.model
        items = masker.prepare(rows)
        parts = []
        for a, b in _utils.model_chunks(self.context, len(rows)):
            out = _utils.as_2d(model(masker.batch(rows[a:b], items[a:b])))
            _utils.count_evaluations(b - a)
            if row_classes is not None:
                assert targets is not None
                out = targets.explained(out, row_classes[a:b])
            parts.append(out)
        return torch.cat(parts)

    def _make_masker(self, tree: _Tree, pixels: torch.Tensor, dtype: torch.dtype,
                     pool: ThreadPoolExecutor | None):
        settings: Settings = self.settings  # type: ignore[assignment]
        mask = settings.mask
        mean, std = self._stats(pixels.shape[1], pixels.device)

        def normalise(p: torch.Tensor) -> torch.Tensor:
            """0-255 pixels -> model input, as the pipeline's ``images.normalise`` (float32 ops)."""
            return ((p.to(pixels.device).contiguous() / 255.0 - mean) / std).to(dtype)

        pixels_hwc = pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        if isinstance(mask, str) and mask.startswith("inpaint_"):
            if pixels.shape[1] not in (1, 3):
                raise ConfigError("explainer.mask", f"inpainting needs 1 or 3 channels, the input has {pixels.shape[1]}")
            assert pool is not None
            return _InpaintMasker(tree, pixels_hwc, mask.upper(), pool, normalise)
        if isinstance(mask, str):  # blur(KX,KY): once per image, exactly as shap's masker does
            size = masking.parse_blur(mask)
            blurred = np.stack([masking.blur(img, size) for img in pixels_hwc])
            filled = torch.from_numpy(blurred).permute(0, 3, 1, 2)
        else:
            colour = torch.tensor(mask, dtype=torch.float64).to(torch.float32)
            if colour.dim() == 1 and colour.shape[0] != pixels.shape[1]:
                raise ConfigError("explainer.mask", f"an [r, g, b] colour needs one value per channel; "
                                                    f"the input has {pixels.shape[1]} channels")
            colour = colour.view(1, -1, 1, 1) if colour.dim() == 1 else colour
            filled = colour.expand(pixels.shape)
        return _FillMasker(tree, normalise(pixels), normalise(filled))

    # -- main ------------------------------------------------------------------------------

    def evaluations_per_image(self) -> int:
        return int(self.settings.max_evals)  # f00 and f11 included, as shap counts them

    def _rounds(self, states: list[_Owen], masker: Any, classes: torch.Tensor, targets: BatchTargets) -> None:
        """The rounds of the Owen expansion of all images together (shared model calls); each image
        keeps its own queue, until every queue is empty."""
        while True:
            rows, counts = [], []
            for i, state in enumerate(states):
                masks = state.next_masks()
                rows += [(i, m) for m in masks]
                counts.append(len(masks))
            if not rows:
                return
            owner = torch.tensor([i for i, _ in rows], device=classes.device)
            fout = self._evaluate(rows, masker, classes[owner], targets)
            fout = fout.double().cpu().numpy()
            pos = 0
            for state, count in zip(states, counts):
                if count:
                    state.absorb(fout[pos:pos + count])
                    pos += count

    def explain(self, images: torch.Tensor, targets: BatchTargets | int, seeds: Sequence[int]) -> Attribution:
        """Explain the selected classes of each image; ``seeds`` are not used (the method is deterministic)."""
        ctx = self.context
        targets = as_targets(targets)
        settings: Settings = self.settings  # type: ignore[assignment]
        if ctx.layer is not None:
            raise ConfigError("model.layer", f"the partition explainer masks input pixels and cannot explain "
                                             f"layer '{ctx.layer_name}'; set model.layer: input")
        if images.dim() != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
        n_images, channels, height, width = images.shape
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")
        device = images.device
        tree = _build_tree((height, width, channels))
        mean, std = self._stats(channels, device)
        # The 8-bit image the pipeline decoded (exact: normalisation is undone and rounded).
        pixels = torch.round((images.float() * std + mean) * 255.0).clamp_(0, 255)

        inpaint = isinstance(settings.mask, str) and settings.mask.startswith("inpaint_")
        pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="inpaint") if inpaint else None
        try:
            masker = self._make_masker(tree, pixels, images.dtype, pool)
            with torch.no_grad():
                # Round 0: fully masked (base value) and unmasked (f(x)) image of every image.
                rows: list[Row] = []
                for i in range(n_images):
                    rows += [(i, ()), (i, (tree.root,))]
                first = self._evaluate(rows, masker).float()
                f_masked, f_image = first[0::2], first[1::2]
                selection = targets.select(f_image)
                classes = selection.classes.to(device)
                k = classes.shape[1]
                base_values = targets.explained(f_masked, classes).double().cpu().numpy()
                outputs = targets.explained(f_image, classes).double().cpu().numpy()
                states = [_Owen(tree, base_values[i], outputs[i], settings.max_evals, settings.batch_size)
                          for i in range(n_images)]

                self._rounds(states, masker, classes, targets)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

        values = _lower_credit(tree, np.stack([s.dvalues for s in states]))[:, :tree.n_leaves]
        values = values.reshape(n_images, height, width, channels, k).transpose(0, 4, 3, 1, 2)
        shap_sum = values.reshape(n_images, k, -1).sum(2)
        return Attribution(
            values=np.ascontiguousarray(values, dtype=np.float32),
            **selection.attribution_fields(),
            outputs=outputs,
            base_values=base_values,
            shap_sum=shap_sum,
        )
