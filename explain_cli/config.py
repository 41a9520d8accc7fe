"""The YAML config: a typed schema (unknown keys are errors), --set overrides, path resolution.

Errors are raised as ConfigError naming the file and the dotted key path, with the nearest
valid key suggested for typos.

Hostile or mistaken files fail fast: the YAML loader refuses duplicate keys (naming key and
line), alias bombs and absurd nesting before anything is built from them; every value is
checked for non-finite floats, integers beyond 64 bits and NUL characters; types are strict
(``true`` is not an integer, ``"3"`` is not a number; a YAML integer is a valid float), and
every numeric key has a documented bound (the ``Field`` limits below and in each explainer).
"""

from __future__ import annotations

import difflib
import errno
import math
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from explain_cli.errors import ConfigError
from explain_cli.targets import TargetsConfig

DEFAULT_INCLUDE = ["*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.webp", "*.npy", "*.dcm"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# Bounds of the numeric keys (docs/config-reference.md, "Bounds and types"): far above any real use, low enough
# that a typo cannot make the run allocate absurd memory before anything is checked.
MAX_CLASSES = 100_000
MAX_TOP_K = 20
MAX_BATCH = 65_536
MAX_BACKGROUND = 10_000
#: Largest background tensor (images x 3 x size x size float32) a config may ask for.
MAX_BACKGROUND_BYTES = 8 * 2**30

# Limits of the YAML loader: a config is a few dozen values.
MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000       # values after expanding aliases (a billion-laughs file expands to 10^9)
MAX_DEPTH = 32            # nesting of mappings and lists
MAX_INT_DIGITS = 30       # longer integer literals are refused before Python parses them
INT_LIMIT = 2**63         # integers must fit 64 bits


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _path_given(v: Any) -> Any:
    """A path key set to '' (e.g. ``--set input.dir=``) would silently mean the config's folder."""
    if isinstance(v, str) and not v.strip():
        raise ValueError("is empty: give a path")
    return v


class ModelConfig(_Section):
    arch: str = Field(description="torchvision:NAME | timm:NAME | python:pkg.module:factory | torchscript")
    num_classes: int | None = Field(default=None, ge=1, le=MAX_CLASSES, description="outputs of the classifier head; default: the architecture's own")
    checkpoint: str | None = Field(default=None, description="weights file (path relative to the config, or pkg:package/path/in/package)")
    weights: Literal["checkpoint", "pretrained", "random"] | None = Field(
        default=None, description="checkpoint: model.checkpoint (implied when it is set); pretrained: the "
        "library's own pretrained weights from the local torch hub / Hugging Face cache (never downloaded); "
        "random: untrained (tests). Required for torchvision:/timm: without a checkpoint; python: "
        "factories and torchscript archives hold their own weights")
    trust_checkpoint: bool = Field(default=False, description="allow unpickling arbitrary objects (a whole nn.Module)")
    key_match: Literal["name", "order"] = Field(default="name", description="map checkpoint keys by name, or by order when names differ but shapes match")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the model factory")
    layer: str = Field(default="input", description="dotted module path to explain at (features.7, layer4.1.conv2) or 'input'")

    _checkpoint_given = field_validator("checkpoint")(_path_given)

    @field_validator("arch")
    @classmethod
    def _arch_form(cls, v: str) -> str:
        if v == "torchscript":
            return v
        source, _, name = v.partition(":")
        if source not in ("torchvision", "timm", "python") or not name:
            raise ValueError("must be torchvision:NAME, timm:NAME, python:pkg.module:factory or torchscript")
        if source == "python" and ":" not in name:
            raise ValueError("python sources are written python:pkg.module:factory")
        return v

    @model_validator(mode="after")
    def _weights(self) -> "ModelConfig":
        """No silent random weights: a library architecture says where its weights come from."""
        library = self.arch.partition(":")[0] in ("torchvision", "timm")
        if self.checkpoint is not None:
            if self.weights in ("pretrained", "random"):
                raise ValueError(f"model.weights: {self.weights} and model.checkpoint exclude each other: "
                                 "remove one (weights: checkpoint is implied by a checkpoint)")
            self.weights = "checkpoint"
        elif self.weights == "checkpoint":
            raise ValueError("model.weights: checkpoint needs model.checkpoint (the weights file)")
        elif library and self.weights is None:
            raise ValueError(f"model.weights: {self.arch} has no model.checkpoint, so its weights would be "
                             "random: set model.weights: pretrained (the library's own pretrained weights, "
                             "from the local cache), give model.checkpoint, or set model.weights: random "
                             "(untrained, for tests)")
        elif not library and self.weights is not None:
            raise ValueError(f"model.weights: {self.weights} applies to torchvision: and timm: architectures; "
                             f"{self.arch.partition(':')[0]} models hold their own weights (leave "
                             "model.weights unset, or give model.checkpoint)")
        return self


class IntensityRange(_Section):
    range: list[float] = Field(description="[lo, hi]: raw values lo..hi map to 0..1 (then mean/std), "
                               "values outside are clipped; e.g. [0, 4095] for 12-bit data")

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not v[0] < v[1]:
            raise ValueError(f"is [lo, hi] with lo < hi (got {v})")
        return v


class DisplayNormalisation(_Section):
    mean: list[float] = Field(description="the mean the user transform normalises with, one value per channel")
    std: list[float] = Field(description="the std the user transform normalises with, one value per channel")


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: preprocess keys a user ``transform`` replaces (it resizes, crops and normalises itself).
TRANSFORM_REPLACES = ("size", "resize", "crop_fraction", "mean", "std", "interpolation", "channels")


class PreprocessConfig(_Section):
    size: int | tuple[int, int] = Field(default=224, description="the model input: one side (square) or "
                                        "[height, width], each 8..4096")
    channels: int = Field(default=3, ge=1, le=64, description="input channels of the model: 3 (RGB), 1 "
                          "(grayscale: no RGB round trip) or N (a multi-page TIFF or .npy array per image)")
    resize: Literal["stretch", "crop"] = Field(default="stretch", description="stretch to size x size, or resize the short side to size/crop_fraction and centre-crop")
    crop_fraction: float = Field(default=0.875, ge=0.05, le=1)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = Field(
        default="bilinear", description="resampling filter (Pillow's, antialiased, as torchvision's Resize on "
        "PIL images)")
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD))
    intensity: Literal["per_image"] | IntensityRange | None = Field(
        default=None, description="raw value -> 0..1: {range: [lo, hi]} (a fixed window), per_image (each image "
        "stretched to its own min..max) or unset: 8-bit data / 255; 16-bit and float data then need this key")
    transform: str | None = Field(default=None, description="python:pkg.module:callable: your own eval transform "
                                  "(PIL image in, CHW tensor out) instead of the keys above")
    display: DisplayNormalisation | None = Field(
        default=None, description="with transform: the mean/std it normalises with, when its last step is not "
        "a torchvision Normalize (overlays and masking explainers undo it)")

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        sides = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(sides) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
            raise ValueError(f"must be a whole number or [height, width] (got {v!r})")
        if not all(8 <= s <= 4096 for s in sides):
            raise ValueError(f"each side must be within 8..4096 (got {v!r})")
        return sides[0] if len(sides) == 1 else (sides[0], sides[1])

    @field_validator("transform")
    @classmethod
    def _transform(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("python:") or v.count(":") != 2 or not all(v.split(":"))):
            raise ValueError(f"is written python:pkg.module:callable (got {v!r})")
        return v

    @model_validator(mode="after")
    def _channels(self) -> "PreprocessConfig":
        given = self.model_fields_set
        if self.transform is not None:
            fields = type(self).model_fields
            clash = [k for k in TRANSFORM_REPLACES  # a dumped config (run.json) holds the defaults: not a clash
                     if k in given and getattr(self, k) != fields[k].get_default(call_default_factory=True)]
            if clash:
                raise ValueError(f"transform replaces preprocess.{', preprocess.'.join(clash)}: remove "
                                 f"{'it' if len(clash) == 1 else 'them'} (the transform resizes and normalises)")
            return self
        if self.display is not None:
            raise ValueError("display applies with preprocess.transform only (mean/std are the normalisation)")
        n = self.channels
        if n != 3 and not {"mean", "std"} <= given:
            raise ValueError(f"channels is {n}: give mean and std with {n} value{'s' if n > 1 else ''} each "
                             f"(the ImageNet defaults are 3 RGB values)")
        if len(self.mean) != n or len(self.std) != n:
            raise ValueError(f"mean and std need {n} value{'s' if n > 1 else ''} each (channels: {n}); got "
                             f"{len(self.mean)} and {len(self.std)}")
        if not all(-10 <= m <= 10 for m in self.mean):
            raise ValueError(f"mean values must be within [-10, 10] on the 0-1 scale (got {self.mean})")
        if not all(1e-3 <= s <= 10 for s in self.std):
            raise ValueError(f"std values must be within [0.001, 10] on the 0-1 scale (got {self.std})")
        return self

    #: output.display_channels, copied here by Config: the decoder draws the display image.
    _display_channels: tuple[int, ...] | None = None
    #: With ``transform``: what it makes (explain_cli.transform.resolve): input_shape, mean, std.
    _resolved: dict[str, Any] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.input_shape[1:]  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one model input (a transform's output shape when there is one)."""
        if self._resolved is not None:
            return tuple(self._resolved["input_shape"])  # type: ignore[return-value]
        h, w = (self.size, self.size) if isinstance(self.size, int) else self.size
        return (self.channels, int(h), int(w))

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the model input is normalised with (a transform's own when there is one)."""
        if self._resolved is not None:
            return tuple(self._resolved["mean"]), tuple(self._resolved["std"])
        return tuple(self.mean), tuple(self.std)


class InputConfig(_Section):
    dir: str = Field(description="folder of images, walked recursively")
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = Field(default_factory=list)

    _dir_given = field_validator("dir")(_path_given)


class BackgroundConfig(_Section):
    from_input: int | None = Field(default=None, ge=1, le=MAX_BACKGROUND, description="sample this many images of input.dir")
    dir: str | None = Field(default=None, description="folder of background images")
    count: int = Field(default=50, ge=1, le=MAX_BACKGROUND, description="images sampled from background.dir")

    _dir_given = field_validator("dir")(_path_given)

    @model_validator(mode="after")
    def _one_source(self) -> "BackgroundConfig":
        if self.from_input is not None and self.dir is not None:
            raise ValueError("give either from_input or dir, not both")
        if self.from_input is None and self.dir is None:
            self.from_input = 50
        return self


class OutputConfig(_Section):
    dir: str = Field(default="out", description="output folder")
    format: Literal["svg", "png"] = "svg"
    top_k: int = Field(default=2, ge=1, le=MAX_TOP_K)
    save_values: bool = False
    dpi: int = Field(default=100, ge=10, le=1200)
    style: Literal["gray", "heat", "shap"] = Field(
        default="gray", description="what the class panels show under the map: gray (the image in gray at 45% "
        "opacity, 2nd-98th percentile contrast stretch), heat (the colour image at 80%), shap "
        "(shap.image_plot's faint 15% gray)")
    caption: bool = Field(default=True, description="a line under the overlay: image, explainer, layer, and "
                          "each map's stability and additivity error when known")
    scale: Literal["per_image", "run"] | float = Field(
        default="per_image", description="the overlays' colour limit: per_image (each image its own), run (one "
        "limit for the whole run, from a calibration sample every shard agrees on) or a positive number")
    display_channels: list[int] | None = Field(
        default=None, description="the input channels the overlay shows (0-based): one (gray) or three (an RGB "
        "composite); default: the image itself for 1 or 3 channels, channels 0-2 for more")

    _dir_given = field_validator("dir")(_path_given)

    @field_validator("scale", mode="before")
    @classmethod
    def _scale(cls, v: Any) -> Any:
        if v in ("per_image", "run"):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v)
        raise ValueError(f"must be per_image, run or a positive number (a fixed colour limit), got {v!r}")


class TissueConfig(_Section):
    min_fraction: float = Field(default=0.5, ge=0, le=1, description="tiles with a smaller share of tissue "
                                "(Otsu on saturation of a thumbnail) are skipped and counted; 0 keeps every tile")
    thumbnail_mpp: float = Field(default=16.0, gt=0, le=1000, description="resolution of the thumbnail the tissue "
                                 "mask and the heatmaps' background are made from, microns per pixel")


class HeatmapConfig(_Section):
    cells: int = Field(default=4, ge=1, le=64, description="each tile's map is summed into cells x cells blocks "
                       "of the slide heatmap")
    tiff: bool = Field(default=False, description="also write heatmap-<class>.tiff: a pyramidal TIFF of the "
                       "coloured heatmap with the slide's pixel size, for QuPath")


class SlidesConfig(_Section):
    """Whole-slide images (or pre-tiled slides) as the unit: tiles in, one heatmap per slide out."""

    tile: int | None = Field(default=None, ge=8, le=16384, description="tile side in pixels at the read "
                             "resolution (before preprocess); with from_names: the tiles' side (default: "
                             "each tile file's own width)")
    mpp: float | None = Field(default=None, gt=0, le=1000, description="read resolution in microns per pixel "
                              "(best pyramid level, then resized); with from_names: the tiles' resolution")
    level: int | None = Field(default=None, ge=0, le=64, description="read at this pyramid level instead of mpp")
    stride: int | None = Field(default=None, ge=1, le=16384, description="tile step in pixels at the read "
                               "resolution; default: tile (no overlap)")
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)
    overlays: bool = Field(default=False, description="also write an overlay per tile (overlays/<slide>/<x>_<y>)")
    from_names: str | None = Field(default=None, description="pre-tiled slides: a regular expression with the "
                                   "named groups slide, x and y, searched in each file's relative path")

    @model_validator(mode="after")
    def _one_resolution(self) -> "SlidesConfig":
        if self.from_names is not None:
            try:
                groups = set(re.compile(self.from_names).groupindex)
            except re.error as exc:
                raise ValueError(f"slides.from_names is not a regular expression: {exc}") from None
            if not {"slide", "x", "y"} <= groups:
                raise ValueError("slides.from_names needs the named groups (?P<slide>...), (?P<x>...) and "
                                 f"(?P<y>...) (it has {sorted(groups) or 'none'})")
            if self.level is not None:
                raise ValueError("slides.level applies to slide files, not to pre-tiled slides (from_names)")
            return self
        if self.tile is None:
            self.tile = 224
        if self.mpp is not None and self.level is not None:
            raise ValueError("give slides.mpp or slides.level, not both")
        if self.mpp is None and self.level is None:
            self.mpp = 0.5
        if self.stride is not None and self.stride > self.tile:
            raise ValueError(f"slides.stride {self.stride} is larger than slides.tile {self.tile}: "
                             "parts of the slide would never be read")
        return self


class Config(_Section):
    model: ModelConfig
    labels: str | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    input: InputConfig
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    explainer: dict[str, Any] = Field(default_factory=lambda: {"name": "gradient"})
    output: OutputConfig = Field(default_factory=OutputConfig)
    slides: SlidesConfig | None = Field(default=None, description="whole-slide images or pre-tiled slides "
                                        "(explain_cli/slides): tiles in, one heatmap per slide out")
    targets: TargetsConfig = Field(default_factory=TargetsConfig, description="which classes are explained "
                                   "and which output quantity (explain_cli/targets.py)")
    batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="model evaluations per forward pass; auto: on CPU timed among sizes that fit a "
                    "memory bound (docs/performance.md), on CUDA the largest that fits")
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype the model runs in (torch.autocast); attributions stay float32")
    device: str = "auto"
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    workers: int | Literal["auto"] = Field(default="auto", description="overlay writer processes; auto = usable cores - 1, 0 = in the main process")
    metrics: list[Literal["deletion", "insertion"]] = Field(
        default_factory=list, description="faithfulness metrics per image and class (extra model evaluations)")
    metrics_steps: int = Field(default=20, ge=2, le=1000, description="steps of the deletion/insertion curves")
    metrics_baseline: Any = Field(default="blur(32,32)", description="what deleted pixels become: "
                                  "blur(KX,KY), a grey level or an [r, g, b] colour (0-255)")

    _labels_given = field_validator("labels")(_path_given)

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, v: list[str]) -> list[str]:
        return [m for m in ("deletion", "insertion") if m in v]

    @field_validator("metrics_baseline")
    @classmethod
    def _baseline(cls, v: Any) -> Any:
        from explain_cli.masking import parse_baseline

        return parse_baseline(v)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> int | str:
        if _auto_or_int_in(v, 1, MAX_BATCH):
            return v
        raise ValueError(f"must be an integer >= 1 and <= {MAX_BATCH}, or 'auto' (got {v!r})")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return validate_device(v)

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if _auto_or_int_in(v, 0, None):
            return v
        raise ValueError(f"must be auto or a whole number >= 0 (0 writes overlays in the main process), got {v!r}")

    @model_validator(mode="after")
    def _display_channels(self) -> "Config":
        shown = self.output.display_channels
        if shown is not None:
            n = self.preprocess.channels
            if len(shown) not in (1, 3):
                raise ValueError(f"output.display_channels: give one channel (gray) or three (RGB), got {shown}")
            if self.preprocess.transform is None and not all(0 <= c < n for c in shown):
                raise ValueError(f"output.display_channels: channels are 0..{n - 1} (preprocess.channels: {n}), "
                                 f"got {shown}")
            self.preprocess._display_channels = tuple(shown)
        return self

    @model_validator(mode="after")
    def _background_memory(self) -> "Config":
        count = self.background.count if self.background.dir is not None else self.background.from_input
        c, h, w = self.preprocess.input_shape
        need = (count or 0) * c * h * w * 4
        if need > MAX_BACKGROUND_BYTES:
            key = "background.count" if self.background.dir is not None else "background.from_input"
            raise ValueError(f"{key}: {count} background images of {c}x{h}x{w} need "
                             f"{need / 2**30:.1f} GiB (limit {MAX_BACKGROUND_BYTES // 2**30} GiB); "
                             f"use fewer images or a smaller preprocess.size")
        return self

    # Filled by load_config: the folder relative paths resolve against, and the source file.
    _base_dir: Path = Path(".")
    _source: str = ""
    _explainer_settings: Any = None

    @property
    def explainer_settings(self):
        """The validated ``explainer.*`` settings of the chosen explainer."""
        return self._explainer_settings

    def resolve(self, path: str | None) -> Path | None:
        """A config path made absolute against the config file's folder."""
        if path is None:
            return None
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(os.path.normpath(self._base_dir / p))


def _auto_or_int_in(v: Any, low: int, high: int | None) -> bool:
    """'auto', or an integer (not a bool) in [low, high]: batch_size and workers take either."""
    return v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= low
                           and (high is None or v <= high))


def validate_device(v: str) -> str:
    v = str(v).strip()
    if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError("must be auto, cpu, cuda or cuda:N")


def _fields_of(model_cls: type[BaseModel], path: tuple) -> list[str]:
    """Valid key names at a location of the schema (for 'did you mean')."""
    cls: Any = model_cls
    for part in path:
        if isinstance(part, int):
            continue
        info = getattr(cls, "model_fields", {}).get(part)
        if info is None:
            return []
        ann = info.annotation
        members = typing.get_args(ann) or (ann,)  # an optional section (X | None) names X's keys
        cls = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def _message(err: dict, root_cls: type[BaseModel], prefix: str = "") -> tuple[str, str]:
    loc = tuple(err.get("loc", ()))
    key = prefix + ".".join(str(p) for p in loc)
    msg = err.get("msg", "invalid value")
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        valid = _fields_of(root_cls, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        msg = f"unknown key{hint}; valid keys here: {', '.join(valid)}"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        ctx = err.get("ctx", {})
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values())) if ctx else "?"
        msg = f"must be {op} {bound} (got {err.get('input')!r})"
    elif kind == "literal_error":
        ctx = err.get("ctx", {})
        expected = ctx.get("expected", "")
        choices = [c.strip().strip("'") for c in str(expected).replace(" or ", ",").split(",") if c.strip()]
        close = difflib.get_close_matches(str(err.get("input")), choices, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        msg = f"must be one of {expected} (got {err.get('input')!r}){hint}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        head, sep, rest = msg.partition(": ")
        if sep and key and head.startswith(key + ".") and " " not in head:
            key, msg = head, rest  # a section's check names the key inside it (model.weights)
    elif kind.endswith("_type") or kind.endswith("_parsing"):
        msg = f"{msg} (got {err.get('input')!r})"
    return key, msg


def _raise_validation(exc: ValidationError, root_cls: type[BaseModel], source: str, prefix: str = "") -> None:
    # an unknown key first: a typo ('modle:') also makes its intended key missing, and the typo is the fix
    errors = sorted(exc.errors(), key=lambda e: e.get("type") != "extra_forbidden")
    key, msg = _message(errors[0], root_cls, prefix)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise ConfigError(key, msg + more, source) from None


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses what no config needs and an attacker could use: duplicate
    keys (silently last-wins otherwise), alias bombs and cycles, absurd nesting, and integer
    literals too long to parse cheaply. Checked on the composed node graph, before any Python
    object is built from it."""

    _depth = 0

    def compose_node(self, parent, index):
        # Stop at the first level too deep: the parser is lazy, so the rest is never read.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _YamlRefusal(f"nested more than {MAX_DEPTH} levels deep (line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _check_graph(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # an unhashable key: SafeConstructor reports it
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _YamlRefusal(f"duplicate key {key!r} (line {line}; first on line {first})")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 1e3, 1e-300 and 1.5e3 as strings (it wants a dot and a signed exponent);
# YAML 1.2 and every user read them as numbers. An integer mantissa with a small non-negative
# exponent is an integer (nsamples: 1e3 -> 1000), anything else a float.
_SCI_TAG = "tag:explain-cli,2024:scientific"
_SCI = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


def _construct_scientific(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | float:
    text = node.value.replace("_", "")
    mantissa, _, exponent = text.lower().partition("e")
    if "." not in mantissa and 0 <= int(exponent) <= 18:
        return int(mantissa) * 10 ** int(exponent)
    return float(text)


_StrictLoader.add_implicit_resolver(_SCI_TAG, _SCI, list("-+0123456789."))
_StrictLoader.add_constructor(_SCI_TAG, _construct_scientific)


class _YamlRefusal(Exception):
    """A YAML document the strict loader refuses; the message says why and where."""


def _check_graph(root) -> None:
    """Expanded size, depth, cycles and integer literals of a composed YAML node graph.

    Aliases make the graph a DAG whose expansion can be exponential (billion laughs), so sizes
    are counted per node with memoisation: linear in the file, not in the expansion.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def visit(node, depth: int, path: str) -> int:
        ident = id(node)
        if ident in sizes:
            return sizes[ident]
        if ident in active:
            raise _YamlRefusal(f"{path or 'the document'}: an alias refers to its own parent (recursive structure)")
        if depth > MAX_DEPTH:
            raise _YamlRefusal(f"{path or 'the document'}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode):
            if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_INT_DIGITS:
                raise _YamlRefusal(f"{path or 'value'}: integer with {len(node.value)} characters "
                                   f"(line {node.start_mark.line + 1}); integers must fit 64 bits")
            sizes[ident] = 1
            return 1
        active.add(ident)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                total += visit(key_node, depth + 1, path)
                total += visit(value_node, depth + 1, f"{path}.{name}" if path else str(name))
                if total > MAX_NODES:
                    break
        else:
            for i, child in enumerate(node.value):
                total += visit(child, depth + 1, f"{path}[{i}]")
                if total > MAX_NODES:
                    break
        active.discard(ident)
        if total > MAX_NODES:
            raise _YamlRefusal(f"{path or 'the document'}: expands to more than {MAX_NODES} values "
                               f"(an alias bomb?); a config holds a few dozen")
        sizes[ident] = total
        return total

    visit(root, 0, "")


def safe_yaml(text: str) -> Any:
    """yaml.safe_load with _StrictLoader's refusals; raises yaml.YAMLError or _YamlRefusal."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise _YamlRefusal(f"nested more than {MAX_DEPTH} levels deep") from None
    finally:
        loader.dispose()


def check_values(data: Any, source: str | None = None, prefix: str = "") -> None:
    """Refuse, naming the key, values no config key can use: non-finite floats, integers
    beyond 64 bits, NUL characters, nesting deeper than MAX_DEPTH (for data from any source)."""
    stack = [(data, prefix, 0)]
    while stack:
        value, key, depth = stack.pop()
        where = key or "(top level)"
        if depth > MAX_DEPTH:
            raise ConfigError(where, f"nested more than {MAX_DEPTH} levels deep", source)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(where, f"must be a finite number (got {value!r})", source)
        if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
            raise ConfigError(where, "integer out of range (must fit 64 bits)", source)
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(where, "contains a NUL character", source)
        if isinstance(value, dict):
            stack.extend((v, f"{key}.{k}" if key else str(k), depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{key}[{i}]", depth + 1) for i, v in enumerate(value))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (['a', 'b'], value parsed as a YAML scalar or list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
    try:
        value = safe_yaml(raw) if raw.strip() else ""
    except _YamlRefusal as exc:
        raise ConfigError(f"--set {key.strip()}", str(exc)) from None
    except yaml.YAMLError:
        value = raw
    check_values(value, "--set", prefix=key.strip())
    return [k for k in key.strip().split(".")], value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        set_key(data, keys, value)
    return data


def set_key(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for part in keys[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[keys[-1]] = value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Read, override and validate a config file; raise ConfigError naming the key on any problem."""
    path = Path(path)
    source = str(path)
    data = _read_yaml_file(path, source, bool(overrides))
    check_values(data, source)
    in_file = data.get("explainer")
    in_file = dict(in_file) if isinstance(in_file, dict) else None
    apply_overrides(data, list(overrides or []))
    for dotted, value in (extra or {}).items():
        if value is not None:
            set_key(data, dotted.split("."), value)
    if in_file is not None:
        _switch_explainer(data, in_file, list(overrides or []), source)
    try:
        config = Config.model_validate(data, strict=True)
    except ValidationError as exc:
        _raise_validation(exc, Config, source)
    return finish(config, path.resolve().parent, source)


def _read_yaml_file(path: Path, source: str, overridden: bool) -> dict[str, Any]:
    """The config file's mapping (empty when the file is empty and overrides give every key)."""
    if not path.exists():
        raise ConfigError("", f"config file not found: {path}", None)
    if not path.is_file():
        raise ConfigError("", f"not a regular file: {path}", None)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError("", f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file", source)
        raw = path.read_bytes()
        data = safe_yaml(raw.decode("utf-8"))
    except _YamlRefusal as exc:
        raise ConfigError("", f"refused: {exc}", source) from None
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}", source) from None
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("", f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}); "
                              f"save the file as UTF-8", source) from None
    except OSError as exc:
        raise ConfigError("", f"cannot read: {exc.strerror or exc}", source) from None
    if data is None and not overridden:
        raise ConfigError("", "config is empty: it needs at least model.arch and input.dir", source)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping of keys", source)
    return data


def finish(config: Config, base_dir: Path, source: str) -> Config:
    """The steps after validation, shared by load_config and the Python API's dicts: the folder paths
    resolve against, the explainer's settings, and a user transform's output shape and normalisation."""
    config._base_dir = base_dir
    config._source = source
    config._explainer_settings = validate_explainer(config.explainer, source)
    if config.preprocess.transform is not None:
        from explain_cli.transform import resolve

        resolve(config.preprocess, base_dir, source)
    return config


def _switch_explainer(data: dict, in_file: dict[str, Any], overrides: list[str], source: str) -> None:
    """``--explainer NAME`` / ``--set explainer.name=NAME`` on a config written for another
    explainer: the file's ``explainer.*`` keys the new one does not have are dropped, with a note
    (keys given on the command line are kept, so a wrong one is still an error)."""
    from explain_cli import explainers

    section = data.get("explainer")
    if not isinstance(section, dict):  # --set explainer=[gradient]: the schema check names it
        return
    new, old = section.get("name", "gradient"), in_file.get("name", "gradient")
    if new == old or not isinstance(new, str) or new not in explainers.names():
        return
    given = {keys[1] for keys in (parse_override(o)[0] for o in overrides) if len(keys) == 2 and keys[0] == "explainer"}
    fields = explainers.get(new).Settings.model_fields
    dropped = [k for k in in_file if k not in fields and k not in given and k in section]
    for key in dropped:
        del section[key]
    if dropped:
        import logging

        logging.getLogger("explain_cli").info(
            "note: explainer.name %s -> %s: dropped the %s key(s) of %s (%s has no such keys)",
            old, new, ", ".join(f"explainer.{k}" for k in dropped), source, new)


def _other_explainers_key(key: str, name: str) -> list[str]:
    """The explainers other than ``name`` that have an ``explainer.KEY``."""
    from explain_cli import explainers

    return [n for n in explainers.names() if n != name and key in explainers.get(n).Settings.model_fields]


def validate_explainer(section: dict[str, Any], source: str = ""):
    from explain_cli import explainers

    if not isinstance(section, dict):
        raise ConfigError("explainer", "must be a mapping with at least 'name'", source)
    name = section.get("name", "gradient")
    module = explainers.get(str(name)) if isinstance(name, str) else None
    if module is None:
        raise ConfigError("explainer.name", "must be a string", source)
    try:
        return module.Settings.model_validate({**section, "name": name}, strict=True)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        owners = _other_explainers_key(str(loc[-1]), name) if first.get("type") == "extra_forbidden" and loc else []
        if owners:  # a key of another explainer: say so rather than suggest a look-alike key
            which = " and ".join(owners) + (" explainers" if len(owners) > 1 else " explainer")
            raise ConfigError(f"explainer.{loc[-1]}", f"a key of the {which}, not of "
                              f"{name}; remove it (switching explainers with --explainer {name} drops such keys); "
                              f"{name}'s keys: {', '.join(module.Settings.model_fields)}", source) from None
        _raise_validation(exc, module.Settings, source, prefix="explainer.")


def resolved_dict(config: Config) -> dict[str, Any]:
    """The resolved config (defaults filled, explainer settings validated) as plain data."""
    data = config.model_dump(mode="json", by_alias=True)
    data["explainer"] = config.explainer_settings.model_dump(mode="json")
    return data


def check_output_dir(output_dir: Path, input_dir: Path | None = None, source: str | None = None,
                     key: str = "output.dir") -> None:
    """Refuse an output folder the run could not use, before any work: a file, a path below a
    file, the input folder itself (or a symlink to it), or a folder this process cannot write
    (read-only file system, permissions), checked by creating and removing a temp file in it or
    in its nearest existing parent. Creates nothing that stays."""
    try:
        _check_output_dir(Path(output_dir), input_dir, source, key)
    except OSError as exc:  # e.g. a parent folder we may not even stat
        raise ConfigError(key, f"cannot use {output_dir}: {exc.strerror or exc}", source) from None


def _check_output_dir(output_dir: Path, input_dir: Path | None, source: str | None, key: str) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(key, f"{output_dir} is a file, not a folder", source)
    existing = output_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{output_dir} is below {existing}, which is a file, not a folder", source)
    if input_dir is not None and os.path.realpath(output_dir) == os.path.realpath(input_dir):
        raise ConfigError(key, f"{output_dir} is the input folder; outputs would be mixed with the "
                               f"images: choose another folder (a subfolder of input.dir is fine)", source)
    try:
        fd, probe = tempfile.mkstemp(prefix=".explain-cli-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        why = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise ConfigError(key, f"cannot write to {existing}: {why}", source) from None


def check_log_file(path: Path) -> None:
    """--log-file must name a file we can append to (not a folder, not below a file)."""
    from explain_cli.errors import UserError

    path = Path(path)
    if path.is_dir():
        raise UserError(f"--log-file: {path} is a folder; give a file name (e.g. {path}/explain.log)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--log-file: {path} is below {parent}, which is a file")


SLURM_INT_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX")


def check_slurm_env(env: dict[str, str] | None = None) -> None:
    """The SLURM_ARRAY_TASK_* variables that select a shard must be integers (usage error otherwise)."""
    from explain_cli.errors import UserError

    env = os.environ if env is None else env
    for name in SLURM_INT_VARS:
        value = env.get(name)
        if value is None:
            continue
        text = value.strip()
        if not (text.isascii() and text.lstrip("-").isdigit() and len(text) <= 18):
            raise UserError(f"{name}={value!r} is not an integer: is this a Slurm array task? "
                            f"Unset it or give --shard I/N")
