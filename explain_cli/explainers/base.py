"""The one small interface every explainer implements: a batch of images in, attributions + top-k out.

An explainer module defines a pydantic ``Settings`` class (its ``explainer.*`` config keys, with
``name`` as a Literal) and an ``Explainer`` subclass, and registers both in ``explainers/__init__``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator


def sample_count(value: object) -> object:
    """An ``nsamples`` value: an integer 1-100000 or 'auto' (a clear message for anything else,
    checked before pydantic's union would report one error per member)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer (1-100000) or 'auto' (got {value!r})")
    if value < 1:
        raise ValueError(f"must be >= 1 (got {value})")
    if value > 100_000:
        raise ValueError(f"must be <= 100000 (got {value})")
    return value


class ExplainerSettings(BaseModel):
    """Base for each explainer's ``explainer.*`` keys; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str



class SampledSettings(ExplainerSettings):
    """Keys shared by the explainers that draw samples (gradient, kernel): ``nsamples`` (a number, or
    ``auto``: rounds until the split-half stability reaches ``target_stability``) and its cap."""

    target_stability: float = Field(0.9, gt=0, lt=1, description="nsamples auto: stop an image at this stability")
    max_nsamples: int = Field(2000, ge=2, le=100_000, description="nsamples auto: at most this many samples per image")

    @field_validator("nsamples", mode="before", check_fields=False)
    @classmethod
    def _nsamples(cls, v: Any) -> Any:
        return sample_count(v)

@dataclass
class ExplainContext:
    """What an explainer needs from the run, built once per run by the pipeline.

    ``background`` is preprocessed (normalised, NCHW) and already on ``device``.
    ``mean``/``std`` let explainers that mask in pixel space (partition, kernel) undo the
    normalisation. ``batch_size`` is the number of model evaluations per forward pass (the
    out-of-memory back-off lowers it; ``batch_size_auto`` marks a search for the largest one that
    fits that has not yet had a success; ``batch_probe``, on the CPU, times the first calls, see
    ``explain_cli.autobatch``). ``precision`` other than
    float32 wraps ``model`` so it runs under ``torch.autocast`` and returns float32 outputs.
    """

    model: "torch.nn.Module"  # noqa: F821
    layer: "torch.nn.Module | None"  # noqa: F821  (None: explain the input pixels)
    layer_name: str
    background: "torch.Tensor"  # noqa: F821
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: "torch.device"  # noqa: F821
    batch_size: int
    settings: ExplainerSettings
    precision: str = "float32"
    batch_size_auto: bool = False
    batch_probe: "autobatch.BatchProbe | None" = None  # noqa: F821  (CPU auto: sizes the first model calls)

    def __post_init__(self) -> None:
        from explain_cli.explainers._precision import with_precision

        self.model = with_precision(self.model, self.precision, self.device)


@dataclass
class Attribution:
    """Result for a batch of N images and their top-k classes (rank order).

    values: (N, k, C, H, W) float32 attribution map in the explained space (the input, or the
        layer's input for a layer target); per-segment explainers paint each segment's value.
    shap_sum: (N, k) sum of the attributions of each class (not always values.sum()).
    outputs: (N, k) the explained model output (e.g. logit) of each class.
    base_values: (N, k) expected output over the background / fully masked image.
    probabilities: (N, k) softmax of the model output for each class.
    segments: optional (N, H, W) integer label maps, for explainers whose features are segments.
    stability: optional (N, k) split-half reliability of each map (``explain_cli.stability``),
        for explainers with random draws; None for deterministic ones (partition).
    deletion_auc, insertion_auc: optional (N, k) faithfulness, filled in by the pipeline when
        ``metrics`` asks for it (``metrics.faithfulness``).
    value_std: optional (N, k, H, W) estimated standard deviation of each pixel's value from the
        sampling noise (kernel: each superpixel's value, painted like ``values``' channel sum;
        Covert & Lee's convergence estimate, ``kernel.value_covariance``).
    nsamples_used: optional (N,) samples (model evaluations) each image's map took, for explainers
        with a sample count (gradient, kernel).
    nsamples_capped: optional (N,) True where ``nsamples: auto`` stopped at ``max_nsamples`` before
        the map reached ``target_stability``; None when the count was fixed.
    ranks, reasons, valid, top_class: from the class selection (``targets.Selection``): each class's
        rank among all outputs (1 = top), why it was chosen ("top_k", "label", "class", joined by
        "+"), which of the k slots are real (images of a batch may be asked fewer classes: the rest
        is padding the writers skip), and each image's top class. None: the k slots are the top k.

    With ``targets.output`` other than logit, or a contrast, ``outputs``, ``base_values`` and
    ``shap_sum`` are in the explained quantity (``targets.TargetSpec.explained``).
    """

    values: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray
    outputs: np.ndarray
    base_values: np.ndarray
    shap_sum: np.ndarray
    segments: np.ndarray | None = None
    stability: np.ndarray | None = None
    deletion_auc: np.ndarray | None = None
    insertion_auc: np.ndarray | None = None
    value_std: np.ndarray | None = None
    nsamples_used: np.ndarray | None = None
    nsamples_capped: np.ndarray | None = None
    ranks: np.ndarray | None = None
    reasons: list[list[str]] | None = None
    valid: np.ndarray | None = None
    top_class: np.ndarray | None = None

    def slots(self, j: int) -> list[int]:
        """The real (not padding) class slots of image ``j``, in the asked order."""
        k = self.classes.shape[1]
        return [r for r in range(k) if self.valid is None or bool(self.valid[j, r])]

    def rank(self, j: int, r: int) -> int:
        return int(self.ranks[j, r]) if self.ranks is not None else r + 1

    def reason(self, j: int, r: int) -> str:
        return self.reasons[j][r] if self.reasons is not None else "top_k"

    @property
    def additivity_error(self) -> np.ndarray:
        return np.abs(self.shap_sum - (self.outputs - self.base_values))


#: Images per explain() call unless an explainer says otherwise (``Explainer.images_per_step``).
DEFAULT_IMAGES_PER_STEP = 8


class Explainer(ABC):
    """Base class: subclasses implement :meth:`explain` for a batch of images."""

    name: ClassVar[str]
    # Masking explainers (partition, kernel) work on input pixels and define "absent" themselves:
    # the pipeline refuses a layer target up front (so `validate` catches it) and loads no background.
    input_only: ClassVar[bool] = False
    uses_background: ClassVar[bool] = True
    # Whether its model calls run a backward pass (they keep every activation): sizes CPU batches.
    backward: ClassVar[bool] = True

    def __init__(self, context: ExplainContext) -> None:
        self.context = context
        self.settings = context.settings

    # --- hooks the pipeline calls; override where the default does not fit ----------------------

    @classmethod
    def check_run(cls, config: Any, model: "nn.Module", num_outputs: int) -> None:  # noqa: F821
        """Refuse (raise ConfigError, exit 2) a config this explainer cannot serve, before any
        work: called by ``pipeline.prepare``, so ``validate`` refuses it too. The default accepts
        every config; amortized refuses a checkpoint trained for another model or setting."""

    @property
    def images_per_step(self) -> int:
        """Images handed to one :meth:`explain` call (the pipeline's step: decode, explain and write
        overlap step by step, and a stop drops at most one step). Default 8; masking explainers
        raise it so one round of masks fills a model batch."""
        return DEFAULT_IMAGES_PER_STEP

    def evaluations_per_image(self) -> int | None:
        """Model evaluations (rows through the model) one image costs, as ``count_evaluations``
        reports them: the total of the progress heartbeat. None when unknown."""
        return None

    @abstractmethod
    def explain(self, images: "torch.Tensor", targets: "BatchTargets | int",  # noqa: F821
                seeds: Sequence[int]) -> Attribution:
        """Explain the classes ``targets`` selects for each image (``targets.as_targets``: an
        integer k means the top k, as logits).

        images: (N, C, H, W) preprocessed batch on ``context.device``.
        seeds: one integer per image; an image's numbers depend only on its seed, never on
            which other images share its batch (so batch size and sharding don't change results).
        """
