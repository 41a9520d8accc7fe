"""Checking the configured preprocessing against the model (issue 28, items 3 and 6).

Two checks, both printed by ``explain-cli validate`` (``init`` uses the first to write its config):

* **the model's own data config** (:func:`model_view`): a ``timm:`` model carries the
  ``pretrained_cfg`` its weights were trained with (input size, mean, std, interpolation,
  ``crop_pct``), read with ``timm.data.resolve_model_data_config`` on the built model, so a
  ``python:`` factory that returns a timm model has one too; a ``torchvision:`` architecture has its
  weights' ``transforms()`` (resize and crop sizes, mean, std, interpolation). Both are read from the
  library's metadata: nothing is downloaded. :func:`preprocess_lines` lists every preprocess value,
  where it came from (``config``: the file or ``--set``; ``default``; ``transform``) and the model's own
  value, and :func:`differences` names the keys that differ (allowed: a warning, not an error).
* **predictions on labelled images** (:func:`check_predictions`): the model's accuracy on up to
  :data:`MAX_CHECKED` labelled images, preprocessed as configured, so a preprocessing mismatch shows
  before a long run. Labels come from ``targets.from_csv``, else (``--check-predictions``) from the
  images' folder names when they name classes (the ImageFolder layout).

Mapping timm's data config to the preprocess keys: ``input_size`` (C, H, W) is ``channels`` and
``size`` (``[H, W]`` when not square), ``interpolation`` and ``mean``/``std`` as they are, and
``crop_pct`` (timm's evaluation transform: resize the short side to ``floor(size / crop_pct)``, then
the centre crop) is ``resize: crop`` with ``crop_fraction`` = ``crop_pct`` (``resize: crop`` is that
same transform). torchvision's weights give ``resize_size`` and ``crop_size``: ``crop_fraction`` is
their ratio, rounded to 4 decimals where that still resizes to ``resize_size`` (0.9655 for 224 / 232).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

log = logging.getLogger("explain_cli")

#: The preprocess keys compared with the model's data config, in the order printed.
KEYS = ("channels", "size", "resize", "crop_fraction", "interpolation", "mean", "std")
#: Labelled images the prediction check runs on (spread evenly over the labelled images of the run).
MAX_CHECKED = 50
#: Below this share of right predictions the check warns (see :func:`_verdict`).
LOW_ACCURACY = 0.5
MEAN_STD_TOLERANCE = 1e-3  # init writes 4 decimals; the libraries' values have up to 8
TIMM_DEFAULT_CROP_PCT = 0.875


# -- the model's own preprocessing -------------------------------------------------------------------

@dataclass
class ModelView:
    """The preprocessing the model's weights were trained (and evaluated) with, as preprocess keys."""

    values: dict[str, Any]
    source: str  # e.g. "timm:resnet18's pretrained config"
    #: True: the configured weights are the ones trained with it (model.weights: pretrained); False: the
    #: architecture's reference only (random weights, or a checkpoint that may have been trained otherwise)
    trained: bool = True
    #: (height, width) the short side is resized to before the centre crop, as the library computes it
    resize_sides: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)


def resize_side(side: int, crop_fraction: float) -> int:
    """The side ``resize: crop`` resizes to before cutting ``side`` pixels: floor(side / crop_fraction),
    timm's ``scale_size`` (images.crop_geometry's rule)."""
    return max(side, math.floor(side / crop_fraction))


def _hw(size: Any) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _size_value(h: int, w: int) -> int | list[int]:
    return h if h == w else [h, w]


def matching_fraction(size: Any, sides: tuple[int, int], preferred: float) -> float:
    """A ``crop_fraction`` that makes ``resize: crop`` resize ``size`` to ``sides`` (the library's own
    resize), ``preferred`` (the library's number, e.g. timm's crop_pct) when that does."""
    h, w = _hw(size)
    candidates = [preferred] + [round(s / t, d) for s, t in ((h, sides[0]), (w, sides[1])) for d in (4, 6, 8)]
    for cf in candidates:
        if 0.05 <= cf <= 1 and resize_side(h, cf) == sides[0] and resize_side(w, cf) == sides[1]:
            return cf
    return preferred


def from_timm_data_config(data: dict[str, Any]) -> tuple[dict[str, Any], tuple[int, int] | None, list[str]]:
    """timm's data config (resolve_model_data_config's dict) as preprocess values, the resize sides of
    its evaluation transform, and notes on what has no preprocess key."""
    from explain_cli.config import INTERPOLATIONS

    values: dict[str, Any] = {}
    notes: list[str] = []
    sides = None
    input_size = data.get("input_size")
    if input_size is not None and len(input_size) == 3:
        c, h, w = (int(v) for v in input_size)
        values["channels"] = c
        values["size"] = _size_value(h, w)
        crop_pct = float(data.get("crop_pct") or TIMM_DEFAULT_CROP_PCT)
        crop_mode = data.get("crop_mode") or "center"
        sides = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        values["resize"] = "crop"
        values["crop_fraction"] = matching_fraction(values["size"], sides, round(crop_pct, 6))
        if crop_mode != "center":
            notes.append(f"timm's crop_mode is {crop_mode!r} (explain-cli's resize: crop keeps the aspect and cuts "
                         f"the centre, timm's 'center'): the same for square images only")
    interpolation = data.get("interpolation")
    if interpolation in INTERPOLATIONS:
        values["interpolation"] = interpolation
    elif interpolation:
        notes.append(f"timm's interpolation {interpolation!r} has no preprocess.interpolation equivalent")
    for key in ("mean", "std"):
        if data.get(key) is not None:
            values[key] = [float(v) for v in data[key]]
    return values, sides, notes


def timm_view(model: Any, arch: str) -> ModelView | None:
    """The data config of a built timm model (its ``pretrained_cfg``), None when it has none."""
    if not (getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)):
        return None
    try:
        import timm.data

        data = timm.data.resolve_model_data_config(model)
    except Exception:  # noqa: BLE001 - no usable metadata: nothing to compare with
        return None
    values, sides, notes = from_timm_data_config(data)
    if not values:
        return None
    return ModelView(values, f"{arch}'s pretrained config" if arch.startswith("timm:")
                     else "the model's timm pretrained_cfg", resize_sides=sides, notes=notes)


def torchvision_view(name: str) -> ModelView | None:
    """The evaluation transform of a torchvision architecture's default weights, None without one."""
    try:
        import torchvision.models

        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop = [int(v) for v in transforms.crop_size]
        resize = [int(v) for v in transforms.resize_size]
        mean = [float(v) for v in transforms.mean]
        std = [float(v) for v in transforms.std]
        interpolation = getattr(transforms.interpolation, "value", str(transforms.interpolation))
    except Exception:  # noqa: BLE001 - weights of another kind (video, detection): nothing to compare
        return None
    h, w = (crop[0], crop[-1])
    size = _size_value(h, w)
    # torchvision resizes the short side to resize_size[0] (one value), then cuts the centre crop_size
    sides = (resize[0], round(resize[0] * w / h)) if len(resize) == 1 else (resize[0], resize[1])
    values = {"channels": 3, "size": size, "resize": "crop",
              "crop_fraction": matching_fraction(size, sides, round(h / sides[0], 4)),
              "interpolation": interpolation, "mean": mean, "std": std}
    return ModelView(values, f"the transforms() of torchvision:{name}'s default weights", resize_sides=sides)


def model_view(model_cfg: Any, model: Any = None) -> ModelView | None:
    """The model's own preprocessing, or None when it carries none (python: factories without timm's
    pretrained_cfg, torchscript). ``model``: the built model (timm reads its pretrained_cfg); without it,
    a timm architecture's default pretrained config."""
    arch = model_cfg.arch
    source, _, name = arch.partition(":")
    view = None
    if source == "torchvision":
        view = torchvision_view(name)
    elif source in ("timm", "python"):
        if model is None and source == "timm":
            try:
                import timm.models

                cfg = timm.models.get_pretrained_cfg(name)
            except Exception:  # noqa: BLE001
                cfg = None
            if cfg is not None:
                values, sides, notes = from_timm_data_config(cfg.to_dict())
                view = ModelView(values, f"{arch}'s pretrained config", resize_sides=sides, notes=notes)
        elif model is not None:
            view = timm_view(model, arch)
    if view is not None:
        view.trained = model_cfg.weights == "pretrained"
        if model_cfg.weights == "random":
            view.source += " (a reference only: the weights are random)"
        elif model_cfg.checkpoint is not None:
            view.source += " (a reference only: model.checkpoint's weights may have been trained otherwise)"
        elif not view.trained:
            view.source += " (a reference only: the factory's weights may have been trained otherwise)"
    return view


# -- the configured preprocessing, value by value ----------------------------------------------------

def _configured(pre: Any) -> dict[str, tuple[Any, str]]:
    """Each compared key's value as the run uses it, and where it came from: config (the file or
    --set), default, or transform (what the user transform makes)."""
    given = pre.model_fields_set
    out: dict[str, tuple[Any, str]] = {}
    if pre.transform is not None:
        c, h, w = pre.input_shape
        mean, std = pre.norm
        norm_from = "preprocess.display" if pre.display is not None else "transform's Normalize"
        out["channels"] = (c, "transform")
        out["size"] = (_size_value(h, w), "transform")
        out["mean"] = ([float(v) for v in mean], norm_from)
        out["std"] = ([float(v) for v in std], norm_from)
        return out
    for key in KEYS:
        value = getattr(pre, key)
        if key == "size":
            value = _size_value(*_hw(value))
        if key in ("mean", "std"):
            value = [float(v) for v in value]
        out[key] = (value, "config" if key in given else "default")
    if pre.resize != "crop":
        out["crop_fraction"] = (out["crop_fraction"][0], "unused (resize: stretch)")
    return out


def _close(a: Iterable[float], b: Iterable[float]) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(abs(x - y) <= MEAN_STD_TOLERANCE for x, y in zip(a, b))


def differences(pre: Any, view: ModelView) -> list[str]:
    """The compared keys whose configured value differs from the model's own (what the model saw in
    training), e.g. ['size', 'interpolation']. crop_fraction is compared by the side it resizes to."""
    configured = _configured(pre)
    found = []
    for key in KEYS:
        if key not in configured or key not in view.values:
            continue
        mine, theirs = configured[key][0], view.values[key]
        if key in ("mean", "std"):
            same = _close(mine, theirs)
        elif key == "size":
            same = _hw(mine) == _hw(theirs)
        elif key == "crop_fraction":
            if pre.resize != "crop" or view.values.get("resize") != "crop":
                continue  # resize differs (or is stretch on both sides): listed there
            if configured["size"][0] == view.values.get("size") and view.resize_sides is not None:
                h, w = _hw(configured["size"][0])
                same = (resize_side(h, mine), resize_side(w, mine)) == tuple(view.resize_sides)
            else:
                same = abs(mine - theirs) <= 1.5e-3
        else:
            same = mine == theirs
        if not same:
            found.append(key)
    return found


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _intensity(pre: Any) -> tuple[str, str]:
    where = "config" if "intensity" in pre.model_fields_set else "default"
    if pre.intensity is None:
        return "unset (8-bit data / 255)", where
    if pre.intensity == "per_image":
        return "per_image (each image stretched to its own min..max)", where
    lo, hi = pre.intensity.range
    return f"range [{lo:g}, {hi:g}]", where


def preprocess_lines(pre: Any, view: ModelView | None) -> list[str]:
    """validate's "preprocess:" block: one line per value with its source and the model's own value."""
    configured = _configured(pre)
    differing = set(differences(pre, view)) if view is not None else set()
    lines = [_block_head(view)]
    if pre.transform is not None:
        lines.append(f"#   {'transform':<14} {pre.transform}   config (it resizes and normalises; "
                     "resize, crop_fraction and interpolation are its own)")
    rows = [(key, *configured[key]) for key in KEYS if key in configured]
    if pre.transform is None:
        rows.append(("intensity", *_intensity(pre)))
    width = max(len(_show(v)) for k, v, _ in rows if k != "intensity")
    source_width = max(len(where) for _, _, where in rows if len(where) <= 24)
    for key, value, where in rows:
        line = f"#   {key:<14} {_show(value):<{width}}  {where:<{source_width}}"
        lines.append((line + _model_column(key, value, configured, view, differing)).rstrip())
    return lines + _block_tail(pre, view, differing)


def _block_head(view: ModelView | None) -> str:
    if view is not None:
        return f"# preprocess: each value, where it came from, and {view.source}:"
    return ("# preprocess: each value and where it came from (the model carries no data config to compare "
            "with: check them against its training transform):")


def _model_column(key: str, value: Any, configured: dict[str, Any], view: ModelView | None,
                  differing: set[str]) -> str:
    """'  model: VALUE   <- differs (...)' for a key the model's data config has, else ''."""
    if view is None or key not in view.values:
        return ""
    text = f"  model: {_show(view.values[key])}" + ("   <- differs" if key in differing else "")
    if key == "crop_fraction" and key in differing and view.resize_sides is not None \
            and _hw(configured["size"][0]) == _hw(view.values["size"]):
        h, w = _hw(configured["size"][0])
        i = 0 if h <= w else 1
        mine = (resize_side(h, value), resize_side(w, value))[i]
        text += f" (short side to {mine} px; the model's transform: {view.resize_sides[i]} px)"
    return text


def _block_tail(pre: Any, view: ModelView | None, differing: set[str]) -> list[str]:
    if view is None:
        return []
    lines = [f"#   note: {note}" for note in view.notes]
    if not differing:
        return lines + ["# preprocess matches the model's own"]
    made = " (the transform's)" if pre.transform is not None else ""
    keys = ", ".join(f"preprocess.{k}{made}" for k in KEYS if k in differing)
    return lines + [f"# preprocess differs from the model's own in {keys} (allowed: the maps then explain "
                    f"what the model does to these inputs, not to what it saw in training)"]


def library_preprocess(arch: str) -> tuple[dict[str, Any], str, dict[str, str]] | None:
    """For ``init``: the preprocess values of a torchvision:/timm: architecture's pretrained weights
    (size, crop_fraction, interpolation, mean, std), where they came from, and a note per key where
    the value is not the library's number as written (crop_fraction); None without metadata."""
    from explain_cli.config import ModelConfig

    try:
        view = model_view(ModelConfig(arch=arch, weights="pretrained"))
    except Exception:  # noqa: BLE001 - an unknown architecture: init reports it when it builds the model
        return None
    if view is None or view.values.get("channels", 3) != 3:
        return None
    values = {k: view.values[k] for k in ("size", "crop_fraction", "interpolation", "mean", "std")
              if k in view.values}
    notes = {}
    if "crop_fraction" in values and view.resize_sides is not None:
        h, w = _hw(values["size"])
        i = 0 if h <= w else 1
        side, cut = view.resize_sides[i], (h, w)[i]
        what = "timm's crop_pct" if arch.startswith("timm:") else f"crop_size {cut} / resize_size {side}"
        notes["crop_fraction"] = (f"{what}: short side to floor({cut} / {values['crop_fraction']:g}) = {side} px, "
                                  f"then the centre crop")
    return values, view.source, notes


# -- predictions on labelled images ------------------------------------------------------------------

@dataclass
class PredictionCheck:
    """The model's predictions on up to MAX_CHECKED labelled images, preprocessed as configured."""

    checked: int = 0
    right: int = 0
    labelled: int = 0  # labelled images among the run's
    unreadable: int = 0
    labels_from: str = ""
    predicted: Counter = field(default_factory=Counter)  # predicted class index -> images
    label_counts: Counter = field(default_factory=Counter)  # first label -> images
    positive_only: bool = False  # a one-output model whose labels can only name its positive class

    @property
    def accuracy(self) -> float:
        return self.right / self.checked if self.checked else 0.0

    @property
    def majority(self) -> float:
        """The share of the most common label: what always answering that class would get right."""
        return max(self.label_counts.values()) / self.checked if self.checked else 0.0

    def line(self) -> str:
        if not self.checked:
            why = f" ({self.unreadable} unreadable)" if self.unreadable else ""
            return f"# predictions: no labelled image could be checked{why} (labels from {self.labels_from})"
        what = "predicted positive" if self.positive_only else "right"
        text = (f"# predictions: {self.right} of {self.checked} labelled images {what} "
                f"({100 * self.accuracy:.0f}%) with this preprocessing (labels from {self.labels_from}")
        if self.labelled > self.checked:
            text += f"; {self.checked} of the {self.labelled} labelled images, spread over them"
        if self.unreadable:
            text += f"; {self.unreadable} unreadable skipped"
        return text + ")"

    def warning(self) -> str | None:
        """Why the accuracy looks like a preprocessing mismatch, or None. Warned when under half are
        right, when the model does no better than always answering the most common label (with two or
        more labels among the checked images), or when every image gets the same class."""
        if self.checked < 2:
            return None
        why = []
        if self.accuracy < LOW_ACCURACY:
            why.append(f"under {100 * LOW_ACCURACY:.0f}% right")
        if len(self.label_counts) > 1 and self.accuracy <= self.majority:
            why.append(f"no better than always answering the most common label ({100 * self.majority:.0f}%)")
        if len(self.predicted) == 1 and len(self.label_counts) > 1:
            why.append(f"all {self.checked} images get the same class")
        if not why:
            return None
        return (f"predictions: {100 * self.accuracy:.0f}% of {self.checked} labelled images right with this "
                f"preprocessing ({'; '.join(why)}): check preprocess (size, resize, mean/std, channels, "
                f"intensity, interpolation) against the model's training transform before a long run")


def folder_labels(images: list[str], labels: list[str]) -> dict[str, tuple[int, ...]]:
    """Each image's class from its folder's name (images/<class>/x.png, torchvision's ImageFolder
    layout): a folder named exactly (else ignoring case, when unique) like a class. Digit-only folder
    names are not read as indices (ImageFolder numbers classes in sorted order, not by name)."""
    by_name = {name: i for i, name in enumerate(labels)}
    folded: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        folded.setdefault(name.casefold(), []).append(i)
    out = {}
    for rel in images:
        if "/" not in rel:
            continue
        folder = rel.rsplit("/", 1)[0].rsplit("/", 1)[-1]
        if folder in by_name:
            out[rel] = (by_name[folder],)
        elif len(folded.get(folder.casefold(), [])) == 1:
            out[rel] = (folded[folder.casefold()][0],)
    return out


def _spread(items: list[str], n: int) -> list[str]:
    """At most ``n`` items spread evenly over ``items`` (their order kept): a folder sorted by class
    still gives every class its share."""
    if len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _predicted(raw: Any, spec: Any) -> list[int]:
    """Each row's predicted class index: a one-output model's by its threshold (binary: 1 positive,
    0 negative; with only the positive class named: 0 positive, -1 'not' it), else the top output."""
    import torch

    if raw.shape[1] == 1:
        positive = torch.sigmoid(raw[:, 0]) >= spec.threshold
        if spec.binary:
            return positive.long().tolist()
        return [0 if p else -1 for p in positive.tolist()]
    return raw.argmax(dim=1).tolist()


def check_predictions(prep: Any, ask_folders: bool = False, batch: int = 16) -> PredictionCheck | None:
    """Forward up to MAX_CHECKED labelled images of ``prep`` (pipeline.Prepared) through the model as a
    run would preprocess them. Labels: ``targets.from_csv``, else (``ask_folders``) folder names. None
    when there are no labels to check against."""
    import numpy as np
    import torch

    from explain_cli.discover import source_path
    from explain_cli.errors import ImageError
    from explain_cli.explainers._precision import with_precision
    from explain_cli.images import load_preprocessed
    from explain_cli.models import _first_tensor

    cfg = prep.config
    if prep.truth is not None:
        truth = {rel: prep.truth.of(rel) for rel in prep.images if prep.truth.of(rel)}
        labels_from = f"{prep.truth.path.name}"
    elif ask_folders:
        truth = folder_labels(prep.images, prep.labels)
        if not truth:
            return None
        labels_from = "folder names"
    else:
        return None
    result = PredictionCheck(labelled=len(truth), labels_from=labels_from)
    result.positive_only = prep.num_outputs == 1 and not prep.targets.binary
    chosen = _spread([rel for rel in prep.images if rel in truth], MAX_CHECKED)
    model = with_precision(prep.model, cfg.precision, prep.device)
    for start in range(0, len(chosen), batch):
        rels, arrays = [], []
        for rel in chosen[start:start + batch]:
            try:
                if prep.slides is not None:
                    arrays.append(prep.slides.source.decode(rel, cfg.preprocess)[1])
                else:
                    arrays.append(load_preprocessed(source_path(prep.input_dir, rel), cfg.preprocess)[1])
                rels.append(rel)
            except ImageError:
                result.unreadable += 1
        if not arrays:
            continue
        with torch.no_grad():
            raw = _first_tensor(model(torch.from_numpy(np.stack(arrays)).to(prep.device)))
        for rel, predicted in zip(rels, _predicted(raw.detach().float().reshape(len(rels), -1), prep.targets)):
            own = truth[rel]
            result.checked += 1
            result.right += predicted in own
            result.predicted[predicted] += 1
            result.label_counts[own[0]] += 1
    return result
