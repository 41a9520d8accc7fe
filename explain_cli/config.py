"""The YAML config: a typed schema (unknown keys are errors), --set overrides, path resolution.

Errors are raised as ConfigError naming the file and the dotted key path, with the nearest
valid key suggested for typos.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from explain_cli.errors import ConfigError

DEFAULT_INCLUDE = ["*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff", "*.bmp", "*.webp"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    arch: str = Field(description="torchvision:NAME | timm:NAME | python:pkg.module:factory | torchscript")
    num_classes: int | None = Field(default=None, ge=1, description="outputs of the classifier head; default: the architecture's own")
    checkpoint: str | None = Field(default=None, description="weights file (path relative to the config, or pkg:package/path/in/package)")
    trust_checkpoint: bool = Field(default=False, description="allow unpickling arbitrary objects (a whole nn.Module)")
    key_match: Literal["name", "order"] = Field(default="name", description="map checkpoint keys by name, or by order when names differ but shapes match")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the model factory")
    layer: str = Field(default="input", description="dotted module path to explain at (features.7, layer4.1.conv2) or 'input'")

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


class PreprocessConfig(_Section):
    size: int = Field(default=224, ge=8, description="side of the square model input")
    resize: Literal["stretch", "crop"] = Field(default="stretch", description="stretch to size x size, or resize the short side to size/crop_fraction and centre-crop")
    crop_fraction: float = Field(default=0.875, gt=0, le=1)
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD))

    @model_validator(mode="after")
    def _channels(self) -> "PreprocessConfig":
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (RGB)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class InputConfig(_Section):
    dir: str = Field(description="folder of images, walked recursively")
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = Field(default_factory=list)


class BackgroundConfig(_Section):
    from_input: int | None = Field(default=None, ge=1, description="sample this many images of input.dir")
    dir: str | None = Field(default=None, description="folder of background images")
    count: int = Field(default=50, ge=1, description="images sampled from background.dir")

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
    top_k: int = Field(default=2, ge=1)
    save_values: bool = False
    dpi: int = Field(default=100, ge=10, le=1200)


class Config(_Section):
    model: ModelConfig
    labels: str | None = None
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    input: InputConfig
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    explainer: dict[str, Any] = Field(default_factory=lambda: {"name": "gradient"})
    output: OutputConfig = Field(default_factory=OutputConfig)
    batch_size: int | Literal["auto"] = Field(
        default="auto",
        description="model evaluations per forward pass; auto: 64 on CPU, the largest that fits on CUDA")
    precision: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="dtype the model runs in (torch.autocast); attributions stay float32")
    device: str = "auto"
    seed: int = 0
    metrics: list[Literal["deletion", "insertion"]] = Field(
        default_factory=list, description="faithfulness metrics per image and class (extra model evaluations)")
    metrics_steps: int = Field(default=20, ge=2, description="steps of the deletion/insertion curves")
    metrics_baseline: Any = Field(default="blur(32,32)", description="what deleted pixels become: "
                                  "blur(KX,KY), a grey level or an [r, g, b] colour (0-255)")

    @field_validator("metrics")
    @classmethod
    def _unique_metrics(cls, v: list[str]) -> list[str]:
        return [m for m in ("deletion", "insertion") if m in v]

    @field_validator("metrics_baseline")
    @classmethod
    def _baseline(cls, v: Any) -> Any:
        from explain_cli.metrics import parse_baseline

        return parse_baseline(v)

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> int | str:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be an integer >= 1 or 'auto' (got {v!r})")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return validate_device(v)

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
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
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
    return key, msg


def _raise_validation(exc: ValidationError, root_cls: type[BaseModel], source: str, prefix: str = "") -> None:
    errors = exc.errors()
    key, msg = _message(errors[0], root_cls, prefix)
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    raise ConfigError(key, msg + more, source) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` -> (['a', 'b'], value parsed as a YAML scalar or list)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
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
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}", None)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}", source) from None
    except UnicodeDecodeError:
        raise ConfigError("", "not a text file", source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping of keys", source)
    apply_overrides(data, list(overrides or []))
    for dotted, value in (extra or {}).items():
        if value is not None:
            set_key(data, dotted.split("."), value)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc, Config, source)
    config._base_dir = path.resolve().parent
    config._source = source
    config._explainer_settings = validate_explainer(config.explainer, source)
    return config


def validate_explainer(section: dict[str, Any], source: str = ""):
    from explain_cli import explainers

    if not isinstance(section, dict):
        raise ConfigError("explainer", "must be a mapping with at least 'name'", source)
    name = section.get("name", "gradient")
    module = explainers.get(str(name)) if isinstance(name, str) else None
    if module is None:
        raise ConfigError("explainer.name", "must be a string", source)
    try:
        return module.Settings.model_validate({**section, "name": name})
    except ValidationError as exc:
        _raise_validation(exc, module.Settings, source, prefix="explainer.")


def resolved_dict(config: Config) -> dict[str, Any]:
    """The resolved config (defaults filled, explainer settings validated) as plain data."""
    data = config.model_dump(mode="json")
    data["explainer"] = config.explainer_settings.model_dump(mode="json")
    return data
