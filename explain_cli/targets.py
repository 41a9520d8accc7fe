"""Which classes are explained, and which quantity of the model's output the values explain.

The ``targets`` config section asks the question: ``classes`` lists what to explain, in order
(class names or indices, ``top_k`` = the ``output.top_k`` highest, ``label`` = the image's own
classes from a truth CSV), ``contrast`` turns every question into "c rather than that class",
``output`` picks the explained quantity (the logit, the probability under ``activation``, or the
log-odds) and ``activation`` says how probabilities are computed (``auto``: sigmoid for a model with
one output, softmax otherwise; ``sigmoid`` for multi-label models).

Every explainer works through this module, so all four answer the same question the same way:

* ``BatchTargets.select(raw_logits)`` picks each image's classes (a :class:`Selection`: classes in
  the asked order, each distinct class once, their rank among all outputs, their probability, why
  each was chosen);
* ``BatchTargets.explained(raw_rows, row_classes)`` maps model outputs to the explained quantity,
  differentiably (gradient), on masked images (partition, kernel) or on references (base values).
  Deep applies the same function through its exact rules (``explainers/deep/head.py``).

Images of one batch may be asked different numbers of classes (``[label, top_k]`` is one class when
the label is the top class and two otherwise): the selection is padded to the batch's largest count
by repeating the image's first class, and ``valid`` marks the slots that are real. Writers skip
padded slots.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from explain_cli.errors import ConfigError

log = logging.getLogger("explain_cli")

TOP_K = "top_k"
LABEL = "label"
MAX_TARGET_CLASSES = 100  # entries of targets.classes (each may be top_k: up to output.top_k classes)


class TruthCsvConfig(BaseModel):
    """``targets.from_csv``: where each image's own class (``label``) comes from."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="CSV file with a header row (relative to the config file)")
    image: str = Field(default="file", description="column holding the image: its path relative to input.dir, "
                                                    "or its file name when that is unique in the folder")
    # 'class' is a Python keyword, hence the alias
    class_column: str = Field(default="label", alias="class",
                              description="column holding the class name (or index); several rows per image "
                                          "give several labels")
    separator: str | None = Field(default=None, min_length=1, max_length=4,
                                  description="split a cell into several labels (e.g. ';'); default: one label per cell")


class TargetsConfig(BaseModel):
    """The ``targets`` config section (docs/targets.md)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    classes: list[int | str] = Field(default_factory=lambda: [TOP_K], min_length=1, max_length=MAX_TARGET_CLASSES)
    from_csv: TruthCsvConfig | None = None
    contrast: int | str | None = None
    output: Literal["logit", "probability", "log_odds"] = "logit"
    activation: Literal["auto", "softmax", "sigmoid"] = "auto"
    negative: str | None = Field(default=None, min_length=1,
                                 description="one-output (sigmoid) model: the name of its negative class (the "
                                             "labels file then names the positive one)")
    threshold: float = Field(default=0.5, gt=0, lt=1,
                             description="one-output (sigmoid) model: the predicted class is the positive one "
                                         "when p >= threshold")

    @field_validator("classes")
    @classmethod
    def _entries(cls, v: list[int | str]) -> list[int | str]:
        for item in v:
            if isinstance(item, str) and not item.strip():
                raise ValueError("an empty class name")
            if isinstance(item, int) and item < 0:
                raise ValueError(f"class index {item} is negative")
        # 'top_k ' is top_k (class names are matched stripped too), and 'label ' needs the CSV like 'label'
        return [item.strip() if isinstance(item, str) else item for item in v]

    @model_validator(mode="after")
    def _label_needs_csv(self) -> "TargetsConfig":
        if LABEL in self.classes and self.from_csv is None:
            raise ValueError("'label' in targets.classes needs targets.from_csv (the CSV with each image's class)")
        return self


def with_negative(labels: list[str], cfg: TargetsConfig, num_outputs: int, source: str | None = None) -> list[str]:
    """A one-output model's class names as [negative, positive] when ``targets.negative`` names the
    negative class (a two-name labels file already is); other models' names unchanged."""
    if cfg.negative is None:
        return labels
    if num_outputs != 1:
        raise ConfigError("targets.negative", f"names the negative class of a one-output (sigmoid) model; this "
                                              f"model has {num_outputs} outputs, each a class of the labels file",
                          source)
    if len(labels) == 2:
        raise ConfigError("targets.negative", "the labels file already names two classes (negative, positive): "
                                              "give the negative class there or here, not both", source)
    if cfg.negative.strip() == labels[0]:
        raise ConfigError("targets.negative", f"{cfg.negative!r} is the positive class's name too", source)
    return [cfg.negative.strip(), labels[0]]


def activation_for(activation: str, num_outputs: int) -> str:
    """``auto``: sigmoid for one output (binary model, class 0 = the positive class), else softmax.
    ``binary`` (set by :func:`resolve` for a one-output model with a named negative class) stays: its
    probabilities are the sigmoid of ``[-z, z]`` (metrics read them so)."""
    if activation == "auto":
        return "sigmoid" if num_outputs == 1 else "softmax"
    return activation


# -- names -> indices ------------------------------------------------------------------------------

def class_index(value: int | str, labels: Sequence[str], key: str, source: str | None = None) -> int:
    """A class given by index or name: the name matches exactly, else case-insensitively; a string of
    digits that names no class is an index. ConfigError (naming the nearest names) otherwise."""
    n = len(labels)
    if isinstance(value, int):
        if not 0 <= value < n:
            raise ConfigError(key, f"class index {value} is out of range: the model has {n} output(s) (0..{n - 1})",
                              source)
        return value
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    folded = [i for i, name in enumerate(labels) if name.casefold() == text.casefold()]
    if len(folded) == 1:
        return folded[0]
    if re.fullmatch(r"-?[0-9]+", text) and len(text) <= 19:  # ASCII digits: '²'.isdigit() is true, int() fails
        return class_index(int(text), labels, key, source)
    if n == 1:  # a sigmoid model's negative class is nameable once the labels say what it is called
        raise ConfigError(key, f"unknown class {text!r}: the model has one output ({labels[0]!r}, a sigmoid); to "
                               f"name its negative class, give the labels file two lines (negative first, then "
                               f"{labels[0]!r}) or set targets.negative: {text}", source)
    close = difflib.get_close_matches(text, list(labels), n=3, cutoff=0.5)
    if not close:  # substring matches help with long ImageNet names ("cat" -> "tiger cat")
        close = [name for name in labels if text.casefold() in name.casefold()][:3]
    hint = f"; nearest: {', '.join(repr(c) for c in close)}" if close else ""
    if len(folded) > 1:
        hint = f"; it matches {len(folded)} names when case is ignored: give the exact name or an index"
    raise ConfigError(key, f"unknown class {text!r}{hint} (a class is a name from the label file or an index "
                           f"0..{n - 1})", source)


# -- the truth CSV -------------------------------------------------------------------------------------

@dataclass
class Truth:
    """Each image's labels (class indices, CSV order) and what the CSV file was."""

    labels: dict[str, tuple[int, ...]]
    path: Path
    unmatched_rows: int = 0

    def of(self, rel: str) -> tuple[int, ...] | None:
        return self.labels.get(rel)


def _match_keys(rel: str) -> list[str]:
    """The CSV spellings that name an image: its path relative to input.dir and its file name, each
    with and without the extension."""
    name = rel.rsplit("/", 1)[-1]
    keys = [rel, name]
    for k in (rel, name):
        stem, dot, _ = k.rpartition(".")
        if dot and stem and not stem.endswith("/"):
            keys.append(stem)
    return keys


def load_truth(cfg: TruthCsvConfig, path: Path, labels: Sequence[str], images: Sequence[str],
               source: str | None = None) -> Truth:
    """Read the truth CSV. A row's image is matched to an image of the run by its path relative to
    input.dir, else by its file name (or either without the extension) when that names exactly one
    image. A label that names no class is a ConfigError naming the CSV line; rows that match no image
    are counted (the folder may hold fewer images than the CSV)."""
    header, rows = _read_truth_csv(path, source)
    columns = _truth_columns(cfg, path, header, source)
    exact = set(images)
    by_key: dict[str, list[str]] = {}
    for rel in images:
        for k in dict.fromkeys(_match_keys(rel)):
            by_key.setdefault(k, []).append(rel)
    found: dict[str, list[int]] = {}
    unmatched = 0
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(columns.values()):
            raise ConfigError("targets.from_csv", f"{path}, line {line}: {len(row)} column(s), the header has "
                                                  f"{len(header)}", source)
        # a leading './' goes (lstrip('./') also ate the dot of '.hidden.png' and the '../' of a wrong path),
        # a Windows '\\' is a '/' unless the name as written is an image's (a Linux name may hold a '\\')
        image = row[columns["image"]].strip()
        if image not in exact:
            image = re.sub(r"^(\./)+", "", image.replace("\\", "/"))
        indices = _row_classes(cfg, row[columns["class"]], labels, path, line, source)
        # the exact relative path names one image even when other images share its file name
        hits = [image] if image in exact else by_key.get(image, [])
        if len(hits) != 1:
            unmatched += 1
            continue
        found.setdefault(hits[0], [])
        for i in indices:
            if i not in found[hits[0]]:
                found[hits[0]].append(i)
    return Truth({rel: tuple(v) for rel, v in found.items()}, path, unmatched)


def _read_truth_csv(path: Path, source: str | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The truth CSV's header (stripped) and its rows with their line numbers; ConfigError naming
    targets.from_csv.path for a file that cannot be read or is no CSV with a header."""
    key = "targets.from_csv.path"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(key, f"file not found: {path}", source) from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not a UTF-8 text file", source) from None
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}", source) from None
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise ConfigError(key, f"{path} is not valid CSV: {exc}", source) from None
    if not header:
        raise ConfigError(key, f"{path} is empty (a header row naming the columns is needed)", source)
    return [h.strip() for h in header], rows


def _truth_columns(cfg: TruthCsvConfig, path: Path, header: list[str], source: str | None) -> dict[str, int]:
    """The positions of the image and class columns; ConfigError naming the missing one."""
    columns = {}
    for what, name in (("image", cfg.image), ("class", cfg.class_column)):
        if name not in header:
            close = difflib.get_close_matches(name, header, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"targets.from_csv.{what}", f"{path} has no column {name!r}{hint}; its columns: "
                                                          f"{', '.join(header)}", source)
        columns[what] = header.index(name)
    return columns


def _row_classes(cfg: TruthCsvConfig, cell: str, labels: Sequence[str], path: Path, line: int,
                 source: str | None) -> list[int]:
    """The class indices of a row's class cell (several with a separator); ConfigError naming the line."""
    key = "targets.from_csv"
    cell = cell.strip()
    names = [c.strip() for c in cell.split(cfg.separator)] if cfg.separator else [cell]
    indices = []
    for name in names:
        if not name:
            raise ConfigError(key, f"{path}, line {line}: the {cfg.class_column!r} cell is empty", source)
        try:
            indices.append(class_index(name, labels, key, source))
        except ConfigError as exc:
            raise ConfigError(key, f"{path}, line {line}: {exc.message}", source) from None
    return indices


# -- what an explainer is asked ---------------------------------------------------------------------

@dataclass(frozen=True)
class TargetSpec:
    """The resolved ``targets`` section: class entries as indices, contrast as an index.

    ``entries`` holds ``"top_k"``, ``"label"`` or a class index, in the asked order.
    """

    entries: tuple[int | str, ...] = (TOP_K,)
    top_k: int = 2
    contrast: int | None = None
    output: str = "logit"
    activation: str = "auto"
    names: tuple[str, ...] = ()  # class names, for descriptions
    #: a one-output (sigmoid) model with a named negative class: class 0 = negative (logit -z, 1 - p),
    #: class 1 = positive (the model's output z, p); see :meth:`outputs`
    binary: bool = False
    threshold: float = 0.5  # a binary model predicts the positive class when p >= threshold

    @property
    def uses_labels(self) -> bool:
        return LABEL in self.entries

    def predicted(self, top_class: int, probability_of_class_0: float) -> str:
        """The ``predicted`` column: the top class; for a one-output model without a named negative
        class, its name when p >= threshold, else ``not <name>`` (the model said "not tumour")."""
        if len(self.names) == 1 and not self.binary:
            return self.names[0] if probability_of_class_0 >= self.threshold else f"not {self.names[0]}"
        return self.names[top_class]

    def describe(self) -> str:
        """What the values explain, for the CSV column ``explained`` (e.g. ``logit``, ``probability -
        probability(tiger cat)``)."""
        if self.contrast is None:
            return self.output
        other = self.names[self.contrast] if self.contrast < len(self.names) else f"class {self.contrast}"
        return f"{self.output} - {self.output}({other})"

    def for_batch(self, labels: Sequence[tuple[int, ...] | None] | None = None) -> "BatchTargets":
        return BatchTargets(self, list(labels) if labels is not None else None)

    def outputs(self, raw: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """The model's outputs (rows, C) as classes: a binary model's one logit ``z`` becomes ``[-z, z]``
        (negative, positive), so sigmoid, log-odds and contrasts of both classes are those of a logit;
        differentiable and linear (deep's rules and Shapley values pass through it exactly)."""
        import torch

        if self.binary and raw.shape[1] == 1:
            return torch.cat([-raw, raw], dim=1)
        return raw

    def is_sigmoid(self, num_outputs: int) -> bool:
        """Whether probabilities are sigmoids (a binary model's two columns are one sigmoid output)."""
        return self.binary or activation_for(self.activation, num_outputs) == "sigmoid"

    # The explained quantity ------------------------------------------------------------------

    def probability(self, raw: "torch.Tensor", classes: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """(rows, k) probability of each class under the activation (float32)."""
        import torch

        sigmoid = self.is_sigmoid(raw.shape[1])
        raw = self.outputs(raw.float())
        if sigmoid:
            return torch.sigmoid(raw.gather(1, classes))
        return torch.softmax(raw, dim=1).gather(1, classes)

    def _quantity(self, raw: "torch.Tensor", classes: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        import torch

        sigmoid = self.is_sigmoid(raw.shape[1])
        raw = self.outputs(raw)
        if self.output == "logit":
            return raw.gather(1, classes)
        if self.output == "probability":
            if sigmoid:
                return torch.sigmoid(raw.gather(1, classes))
            return torch.softmax(raw, dim=1).gather(1, classes)
        # log-odds log(p / (1 - p)): the logit itself under a sigmoid; z_c - logsumexp(z_others) under a
        # softmax, computed on the other classes directly (stable however confident the model is)
        if sigmoid:
            return raw.gather(1, classes)
        return raw.gather(1, classes) - torch.logsumexp(others(raw, classes), dim=2)

    def explained(self, raw: "torch.Tensor", classes: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        """(rows, k): the quantity the values explain for each row's classes (rows, k), differentiable;
        with a contrast, minus the same quantity of the contrast class."""
        value = self._quantity(raw, classes)
        if self.contrast is not None:
            other = classes.new_full((classes.shape[0], 1), self.contrast)
            value = value - self._quantity(raw, other)
        return value


def others(raw: "torch.Tensor", classes: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """(rows, k, C - 1): each row's outputs without class ``classes[row, j]`` (for log-odds)."""
    import torch

    n_classes = raw.shape[1]
    rest = torch.arange(n_classes - 1, device=raw.device)
    # the index of the j-th "other" class of c: j below c, j + 1 from c on
    index = rest.view(1, 1, -1) + (rest.view(1, 1, -1) >= classes.unsqueeze(2)).long()
    return raw.unsqueeze(1).expand(-1, classes.shape[1], -1).gather(2, index)


@dataclass
class Selection:
    """The classes chosen for a batch of N images (k slots each, padded; see the module docstring)."""

    classes: "torch.Tensor"  # (N, k) long, on the device of the outputs  # noqa: F821
    probabilities: np.ndarray  # (N, k) float32, under the activation
    ranks: np.ndarray  # (N, k) int64, 1 = the model's top class
    reasons: list[list[str]]  # (N, k) why each slot was chosen: "top_k", "label", "class" joined by "+"
    valid: np.ndarray  # (N, k) bool
    top_class: np.ndarray  # (N,) int64, each image's top class

    def attribution_fields(self) -> dict[str, Any]:
        return {"classes": self.classes.cpu().numpy().astype(np.int64), "probabilities": self.probabilities,
                "ranks": self.ranks, "reasons": self.reasons, "valid": self.valid, "top_class": self.top_class}


@dataclass
class BatchTargets:
    """A :class:`TargetSpec` and the labels of one batch's images (None without a truth CSV)."""

    spec: TargetSpec
    labels: list[tuple[int, ...] | None] | None = field(default=None)

    def select(self, raw: "torch.Tensor") -> Selection:  # noqa: F821
        """Each image's classes in the asked order, each distinct class once, from its raw outputs."""
        import torch

        raw = raw.detach().float()
        spec = self.spec
        if spec.binary and raw.shape[1] == 1:  # ranked by the threshold: the positive class first when p >= t
            positive = torch.sigmoid(raw[:, 0]) >= spec.threshold
            order = torch.stack([positive.long(), (~positive).long()], dim=1)
            raw = spec.outputs(raw)
        else:
            order = torch.argsort(raw, dim=1, descending=True, stable=True)
        n_images, n_classes = raw.shape
        ranks_all = torch.empty_like(order)
        ranks_all.scatter_(1, order, torch.arange(1, n_classes + 1, device=raw.device).expand(n_images, -1))
        order_np = order.cpu().numpy()
        chosen: list[list[int]] = []
        why: list[list[str]] = []
        for i in range(n_images):
            picks: dict[int, list[str]] = {}
            for entry in self.spec.entries:
                if entry == TOP_K:
                    items, reason = order_np[i, :min(self.spec.top_k, n_classes)].tolist(), TOP_K
                elif entry == LABEL:
                    own = self.labels[i] if self.labels is not None else None
                    if own is None:
                        raise ValueError("an image without a label was asked for its label")
                    items, reason = list(own), LABEL
                else:
                    items, reason = [int(entry)], "class"
                for c in items:
                    if reason not in picks.setdefault(c, []):
                        picks[c].append(reason)
            chosen.append(list(picks))
            why.append(["+".join(r) for r in picks.values()])
        k = max(len(c) for c in chosen)
        valid = np.zeros((n_images, k), dtype=bool)
        padded = np.zeros((n_images, k), dtype=np.int64)
        for i, c in enumerate(chosen):
            valid[i, :len(c)] = True
            padded[i] = c + [c[0]] * (k - len(c))
            why[i] += [""] * (k - len(c))
        classes = torch.from_numpy(padded).to(raw.device)
        return Selection(
            classes=classes,
            probabilities=self.spec.probability(raw, classes).cpu().numpy().astype(np.float32),
            ranks=ranks_all.gather(1, classes).cpu().numpy().astype(np.int64),
            reasons=why, valid=valid, top_class=order_np[:, 0].astype(np.int64))

    def explained(self, raw: "torch.Tensor", classes: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
        return self.spec.explained(raw, classes)


def as_targets(targets: "BatchTargets | TargetSpec | int", n_images: int | None = None) -> BatchTargets:
    """An explainer's ``targets`` argument: a plain integer means "the top k, logits" (the explainers'
    long-standing call ``explain(images, k, seeds)``)."""
    if isinstance(targets, BatchTargets):
        return targets
    if isinstance(targets, TargetSpec):
        return targets.for_batch()
    return TargetSpec(top_k=int(targets)).for_batch()


def expected_explained(spec: BatchTargets | TargetSpec, raw_references: "torch.Tensor",  # noqa: F821
                       classes: "torch.Tensor") -> "torch.Tensor":  # noqa: F821
    """(N, k): the mean over the references (B, C) of the explained quantity of each image's classes
    (the base value of gradient and deep)."""
    import torch

    spec = spec.spec if isinstance(spec, BatchTargets) else spec
    flat = classes.reshape(-1)
    unique, inverse = torch.unique(flat, return_inverse=True)
    means = torch.stack([spec.explained(raw_references, c.expand(raw_references.shape[0], 1)).mean()
                         for c in unique.view(-1, 1)])
    return means[inverse].view(classes.shape)


def resolve(cfg: TargetsConfig, labels: Sequence[str], top_k: int, source: str | None = None,
            num_outputs: int | None = None) -> TargetSpec:
    """Names and indices checked against the model's outputs (ConfigError naming the key otherwise).
    A one-output model with two names (``num_outputs`` 1) is binary: see :attr:`TargetSpec.binary`."""
    entries: list[int | str] = []
    for item in cfg.classes:
        if item in (TOP_K, LABEL):
            entries.append(item)
        else:
            entries.append(class_index(item, labels, "targets.classes", source))
    contrast = None if cfg.contrast is None else class_index(cfg.contrast, labels, "targets.contrast", source)
    num_outputs = len(labels) if num_outputs is None else num_outputs
    binary = num_outputs == 1 and len(labels) == 2
    if cfg.activation == "softmax" and num_outputs == 1:
        raise ConfigError("targets.activation", "a softmax over one output is always 1: use sigmoid "
                                                "(or auto) for a model with one output", source)
    return TargetSpec(entries=tuple(dict.fromkeys(entries)), top_k=top_k, contrast=contrast, output=cfg.output,
                      activation="binary" if binary else cfg.activation, names=tuple(labels), binary=binary,
                      threshold=cfg.threshold)
