"""Amortized Shapley values (FastSHAP): a trained explainer network gives a map in one forward pass.

FastSHAP (Jethani, Sudarshan, Covert, Lee, Runge, ICLR 2022) trains a network ``phi(x)`` whose
optimum is the Shapley values of the masking game ``v(S)`` (the model's outputs with the players
outside ``S`` hidden). ``explain-cli train`` (``explain_cli.train``) fits it for one model, one set
of players (a G x G grid, ``masking.grid_labels``) and one fill (``masking.fill_pixels``), and
writes ``explainer.pt``; this module loads that file and explains with it.

Per batch of images: the model runs on the images (``v(all)``) and on their fill images
(``v(none)``), the explainer network runs once, and its values are shifted additively so that each
class's values sum exactly to ``v(all) - v(none)`` (FastSHAP's additive efficiency normalisation,
the same as in training): ``phi = raw + (v(all) - v(none) - sum(raw)) / M``. The network outputs
all of the model's classes, so any class selection (``targets``: top-k, named classes, labels from a
CSV) works, and a contrast too (Shapley values are linear: the values of ``logit(c) -
logit(contrast)`` are the difference of the two classes' values); the explained quantity must be
the logit, the game it was trained on. Values are painted per patch like
kernel's (``masking.paint``) and ``segments`` is the grid, so overlays, topk.csv (additivity exact
up to float rounding) and the faithfulness metrics work as for kernel. The method is deterministic:
``stability`` is blank and ``seeds`` are not used.

``explainer.pt`` is data, never code: a dict of tensors, numbers and strings loaded with
``torch.load(weights_only=True)``. It records what it was trained for (the model's fingerprint,
its number of outputs, the players, the fill and the preprocessing); a run whose config differs is
refused (exit 2) with the reason.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from explain_cli import masking
from explain_cli.errors import ConfigError
from explain_cli.explainers import _precision, _utils, base
from explain_cli.explainers.base import Attribution, ExplainerSettings
from explain_cli.masking import SegmentSettings
from explain_cli.targets import BatchTargets, as_targets

FORMAT = "explain-cli amortized explainer"
VERSION = 1
DEFAULT_GRID = 8


class TrainSettings(BaseModel):
    """``explainer.train.*``: how ``explain-cli train`` fits the explainer (not used by ``run``)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(30, ge=1, le=100_000, description="passes over the training images")
    images_per_step: int = Field(8, ge=1, le=4096, description="images per optimiser step")
    pairs: int = Field(16, ge=1, le=4096, description="coalitions per image per step, each with its "
                                                      "complement (2 * pairs model evaluations)")
    learning_rate: float = Field(2e-3, gt=0, le=1, description="Adam's learning rate (cosine decay to 0)")
    network: Literal["auto", "features", "pixels"] = Field(
        "auto", description="the explainer network: 'features' (a head on the model's last feature map, "
                            "values through the model's own classifier), 'pixels' (a small conv net on the image "
                            "and its fill, trained from scratch), 'auto' (features when the model ends in global "
                            "average pooling and a linear layer, checked on a probe; else pixels)")
    width: int = Field(32, ge=4, le=512, description="channels of the pixels network's first layer; the features "
                                                     "head has 8 x width")
    holdout: float = Field(0.2, ge=0, lt=1, description="fraction of the images held out for validation")
    augment: bool = Field(True, description="random crops (50-100 % of the area) and horizontal flips")
    validate_nsamples: int | Literal["auto"] = Field(
        "auto", description="kernel evaluations per held-out image for the final check against Kernel SHAP "
                            "(0: skip it); auto: up to 2000, with validate_images, so that the check costs at "
                            "most 20 % of the training's model evaluations (at least 1 image x 200)")
    validate_images: int = Field(8, ge=1, le=10_000, description="held-out images in that check (at most)")

    @field_validator("validate_nsamples")
    @classmethod
    def _nsamples(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 100_000:
            raise ValueError("must be 0..100000 or auto")
        return v


class Settings(ExplainerSettings):
    """``explainer.*`` keys of the amortized (FastSHAP) explainer."""

    name: Literal["amortized"] = "amortized"
    checkpoint: str | None = Field(None, description="explainer.pt written by explain-cli train (path "
                                                     "relative to the config); required by run")
    segments: SegmentSettings | None = Field(None, description="players: {grid: G}; default for train "
                                                               f"{{grid: {DEFAULT_GRID}}}, for run the checkpoint's")
    fill: Any = Field(None, description="hidden patches: as kernel's fill; default for train 'mean', "
                                        "for run the checkpoint's")
    train: TrainSettings = Field(default_factory=TrainSettings)

    @field_validator("fill")
    @classmethod
    def _fill(cls, v: Any) -> Any:
        return None if v is None else masking.parse_fill(v)

    @model_validator(mode="after")
    def _grid_only(self) -> "Settings":
        if self.segments is not None and self.segments.grid is None:
            raise ValueError("segments: the amortized explainer needs grid players, e.g. segments: {grid: 8} "
                             "(SLIC superpixels differ from image to image)")
        return self

    def grid(self) -> int:
        return int(self.segments.grid) if self.segments is not None else DEFAULT_GRID

    def fill_or_default(self) -> Any:
        return "mean" if self.fill is None else self.fill


# -- the explainer network ---------------------------------------------------------------------------

class ExplainerNet(nn.Module):
    """(image, fill image) -> (outputs, G*G) player values, before the efficiency normalisation.

    Why this shape: a player's value depends on how its patch differs from the fill and on the rest
    of the image (the class evidence elsewhere), and for most classifiers on where the patch is. So
    the network sees the image, its fill image and two coordinate channels, resized to 8G x 8G; a
    small convolutional encoder (no normalisation layers: the contrast between image and fill must
    keep its scale) downsamples them to one feature vector per patch, a global average of those is
    appended to each, and 1x1 convolutions map them to every class's value. It costs a few percent
    of a classifier's forward pass and is trained from scratch, so it works for any model
    (docs/explainers/amortized.md has the measurements).
    """

    def __init__(self, channels: int, outputs: int, grid: int, width: int) -> None:
        super().__init__()
        self.grid = grid
        w = width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU()]

        self.encoder = nn.Sequential(*block(2 * channels + 2, w, 1), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                                     *block(4 * w, 4 * w, 2))
        self.head = nn.Sequential(nn.Conv2d(8 * w, 4 * w, 1), nn.ReLU(), nn.Conv2d(4 * w, outputs, 1))

    def forward(self, x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        side = 8 * self.grid
        x = torch.cat([x, fill], 1)
        if tuple(x.shape[-2:]) != (side, side):
            x = nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False,
                                          antialias=True)
        axis = torch.linspace(-1, 1, side, device=x.device, dtype=x.dtype)
        coords = torch.stack(torch.meshgrid(axis, axis, indexing="ij")).expand(x.shape[0], -1, -1, -1)
        f = self.encoder(torch.cat([x, coords], 1))  # (N, 4w, G, G)
        f = torch.cat([f, f.mean((2, 3), keepdim=True).expand_as(f)], 1)
        return self.head(f).flatten(2)  # (N, outputs, G*G), players row-major as masking.grid_labels


class FeatureNet(nn.Module):
    """(features of the image, features of its fill) -> (N, outputs, G*G) player values.

    Why this shape: when the logits are ``W mean_hw(f) + b`` for a feature map ``f`` (global average
    pooling and a linear layer: most CNN classifiers), the masking game of every class is ``W`` times
    the game of the pooled features, and Shapley values are linear: the values of class ``c`` are
    ``W_c . e_p`` with ``e_p`` the Shapley values of the pooled-feature game. So the network predicts
    one vector per patch in the classifier's input space (it starts from the patch's share of the
    pooled feature difference between image and fill, plus a learned correction from a few
    convolutions over both feature maps) and the model's own classifier turns it into all classes'
    values: one head serves 1000 classes, and it reads features the model already computed for
    ``v(all)`` and ``v(none)``. Measured against the pixels network in bench/results-amortized.txt.
    """

    def __init__(self, dim: int, grid: int, width: int) -> None:
        super().__init__()
        self.grid = grid
        self.inp = nn.Sequential(nn.Conv2d(2 * dim, width, 1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(width, dim, 1)

    def forward(self, fx: torch.Tensor, ff: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        size = (self.grid, self.grid)
        share = nn.functional.interpolate(fx - ff, size=size, mode="bilinear", align_corners=False) / (self.grid ** 2)
        hidden = nn.functional.interpolate(self.inp(torch.cat([fx, ff], 1)), size=size, mode="bilinear",
                                           align_corners=False)
        vectors = (share + self.out(self.mid(hidden))).flatten(2)  # (N, D, M)
        return torch.einsum("cd,ndm->ncm", weight.to(vectors.dtype), vectors)


@contextmanager
def tap(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect ``module``'s outputs of the forward calls inside the block (the hook is always removed)."""
    outputs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach()))
    try:
        yield outputs
    finally:
        handle.remove()


def forward_reading_features(model: nn.Module, rows: torch.Tensor, batch_size: int, features: nn.Module | None,
                             keep: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's outputs for ``rows``, and the maps of ``features`` for the first ``keep`` rows
    (None without a features module); the other rows run without the hook, so their maps are
    never kept."""
    if features is None:
        return _utils.forward_in_chunks(model, rows, batch_size), None
    with tap(features) as maps:
        head = _utils.forward_in_chunks(model, rows[:keep], batch_size)
    if rows.shape[0] == keep:
        return head, torch.cat(maps)
    return torch.cat([head, _utils.forward_in_chunks(model, rows[keep:], batch_size)]), torch.cat(maps)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` equal up to rounding in the coarser of their dtypes: a model whose own weights
    are bfloat16 rounds at 8e-3, where a fixed float32 tolerance would see no structure at all."""
    eps = max(torch.finfo(a.dtype).eps, torch.finfo(b.dtype).eps)
    tol = max(1e-4, 16 * eps)
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * 0.1)


def _trained_size(data: dict[str, Any]) -> int | tuple[int, int]:
    """The checkpoint's input size: a side, or (height, width)."""
    size = data["preprocess"]["size"]
    return int(size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def find_feature_map(model: nn.Module, size: int | tuple[int, int], channels: int, num_outputs: int,
                     device: torch.device | str = "cpu") -> tuple[nn.Module, nn.Linear] | None:
    """(feature module, classifier) when the model's outputs are a linear layer of the global
    average of a (N, D, h, w) feature map, checked numerically on a probe of two random images;
    None otherwise (other heads, token models, extra layers after the pooling).

    The probe runs the model without its ``precision`` wrapper, in float32: the structure is a
    property of the layers, and under bfloat16 autocast the pooled vector and the mean of the map
    differ by bfloat16 rounding (8e-3), which a float32 tolerance reads as "no feature map"."""
    model = _precision.unwrap(model)
    records: list[tuple[nn.Module, Any, Any]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: records.append((mod, inp, out)))
               for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            height, width = (size, size) if isinstance(size, int) else size
            probe = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
            param = next(model.parameters(), None)
            out = model(probe.to(device=device, dtype=param.dtype if param is not None and param.is_floating_point()
                                 else torch.float32))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_outputs):
        return None
    return _pooled_head(records, out)


def _pooled_head(records: list[tuple[nn.Module, Any, Any]], out: torch.Tensor) -> tuple[nn.Module, nn.Linear] | None:
    """From the modules' (module, input, output) in call order: the last linear layer that gives the
    model's outputs, and the feature module whose map's global average is that layer's input."""
    for i in range(len(records) - 1, -1, -1):
        mod, inp, res = records[i]
        if isinstance(mod, nn.Linear) and isinstance(res, torch.Tensor) and res.shape == out.shape and _close(res, out):
            pooled = inp[0] if inp else None
            if not isinstance(pooled, torch.Tensor) or pooled.dim() != 2:
                return None
            for fmod, _, f in reversed(records[:i]):
                if isinstance(f, torch.Tensor) and f.dim() == 4 and f.shape[:2] == pooled.shape \
                        and f.shape[2] * f.shape[3] > 1 and _close(f.float().mean((2, 3)), pooled):
                    return fmod, mod
            return None
    return None


def feature_map_for(data: dict[str, Any], model: nn.Module, channels: int, path: Path | str,
                    device: torch.device | str = "cpu", source: str | None = None) -> tuple[nn.Module, nn.Linear] | None:
    """The feature module and classifier a features checkpoint ``data`` reads in ``model`` (None for
    a pixels checkpoint); refuses (exit 2) a model without that structure or of another feature size.
    ``check_run`` (so ``validate``) and the explainer (``run``) call this one probe, so both refuse
    the same checkpoints for the same reason."""
    if data["network"]["kind"] != "features":
        return None
    found = find_feature_map(model, _trained_size(data), channels, int(data["model"]["outputs"]), device)
    dim = int(data["network"]["dim"])
    if found is None:
        refuse(path, ["it is a features explainer, which reads the feature map before the model's global "
                      "average pooling and linear classifier, and this model's outputs are not a linear layer of "
                      "the global average of a feature map (train a pixels explainer: train.network: pixels)"],
               source)
    if found[1].in_features != dim:
        refuse(path, [f"it reads a {dim}-channel feature map before global pooling; this model's has "
                      f"{found[1].in_features} channels"], source)
    return found


def raw_values(net: nn.Module, x: torch.Tensor, fills: torch.Tensor, features: torch.Tensor | None,
               weight: torch.Tensor | None) -> torch.Tensor:
    """(N, outputs, M) values before the efficiency normalisation, for either network; ``features``
    are the feature maps of ``cat([x, fills])`` (features network only)."""
    if isinstance(net, FeatureNet):
        n = x.shape[0]
        return net(features[:n].float(), features[n:2 * n].float(), weight)
    return net(x, fills)


def efficient(raw: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """FastSHAP's additive efficiency normalisation: (N, K, M) values shifted so that each (image,
    class) sums to ``total`` (N, K) = v(all) - v(none)."""
    return raw + ((total - raw.sum(-1)) / raw.shape[-1]).unsqueeze(-1)


def build_net(meta: dict[str, Any]) -> nn.Module:
    net_meta = meta["network"]
    if net_meta.get("kind", "pixels") == "features":
        return FeatureNet(int(net_meta["dim"]), int(net_meta["grid"]), 8 * int(net_meta["width"]))
    return ExplainerNet(int(net_meta["channels"]), int(net_meta["outputs"]), int(net_meta["grid"]),
                        int(net_meta["width"]))


# -- what a checkpoint was trained for -------------------------------------------------------------

def fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (values, dtypes and shapes, in order; names are
    left out so a wrapper such as the precision wrapper does not change it)."""
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def preprocess_record(preprocess: Any) -> dict[str, Any]:
    """The preprocessing an explainer was trained with; keys added later (channels, interpolation,
    intensity) only when not their default, so older checkpoints still match."""
    size = preprocess.size
    record = {"size": int(size) if isinstance(size, int) else [int(v) for v in size],
              "resize": str(preprocess.resize), "crop_fraction": float(preprocess.crop_fraction),
              "mean": [float(v) for v in preprocess.mean], "std": [float(v) for v in preprocess.std]}
    for key, default in (("channels", 3), ("interpolation", "bilinear"), ("intensity", None)):
        value = getattr(preprocess, key, default)
        if value != default:
            record[key] = value if key != "intensity" or isinstance(value, str) else {"range": list(value.range)}
    return record


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict (weights_only: data, never code); ConfigError when it is not one."""
    key = "explainer.checkpoint"
    if not path.is_file():
        raise ConfigError(key, f"not a file: {path} (write it with explain-cli train)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our file"
        raise ConfigError(key, f"{path} is not an explainer written by explain-cli train "
                               f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(key, f"{path} is not an explainer written by explain-cli train")
    if data.get("version") != VERSION:
        raise ConfigError(key, f"{path} has format version {data.get('version')}; this explain-cli reads "
                               f"version {VERSION}: train it again")
    problem = checkpoint_problem(data)
    if problem:
        raise ConfigError(key, f"{path} is damaged or was not written by explain-cli train: {problem}")
    return data


def training_record(config: Any) -> dict[str, Any] | None:
    """run.json's ``explainer_training``: how the amortized explainer of ``config`` was trained and how
    far its maps agreed with Kernel SHAP on held-out images (``kernel_median_pearson``), so a run's
    reader can judge its maps; None for other explainers or an unreadable file (prepare refuses it)."""
    settings = config.explainer_settings
    if getattr(settings, "name", None) != "amortized" or not getattr(settings, "checkpoint", None):
        return None
    try:
        data = load_checkpoint(config.resolve(settings.checkpoint))
    except ConfigError:
        return None
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    validation = data.get("validation") if isinstance(data.get("validation"), dict) else {}
    keep = ("holdout_images", "val_r2", "kernel_images", "kernel_nsamples", "kernel_median_pearson")
    return {"file": str(config.resolve(settings.checkpoint)),
            "images": training.get("images"), "epochs": training.get("epochs"),
            **{k: validation.get(k) for k in keep}}


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


#: The sections and fields of an explainer file that run reads, with their types.
_CHECKPOINT_SHAPES = {"model": {"arch": str, "fingerprint": str, "outputs": int}, "players": {"grid": int},
                      "preprocess": {"size": int, "mean": list, "std": list},
                      "network": {"channels": int, "outputs": int, "grid": int, "width": int}}


def checkpoint_problem(data: dict[str, Any]) -> str | None:
    """Why ``data`` is not an explainer as ``explain-cli train`` writes it (None: it is one): every key
    run reads, with its type, and a state_dict whose names and shapes are those of the recorded
    network (checked on the meta device: a forged size allocates nothing)."""
    return _field_problem(data) or _network_problem(data) or _state_dict_problem(data)


def _field_problem(data: dict[str, Any]) -> str | None:
    """A section or field of _CHECKPOINT_SHAPES missing or of another type."""
    for section, fields in _CHECKPOINT_SHAPES.items():
        value = data.get(section)
        if not isinstance(value, dict):
            return f"'{section}' is missing or not a mapping"
        for name, kind in fields.items():
            item = value.get(name)
            if section == "preprocess" and name == "size" and isinstance(item, list) and len(item) == 2 \
                    and all(_is_int(v) for v in item):
                continue  # [height, width]
            if not (_is_int(item) if kind is int else isinstance(item, kind)):
                return f"'{section}.{name}' is missing or not {'a positive integer' if kind is int else kind.__name__}"
    return None


def _network_problem(data: dict[str, Any]) -> str | None:
    """A network kind, grid or size that does not fit the rest of the file; a non-numeric mean or
    std; a fill kernel's syntax does not read."""
    network = data["network"]
    if network.get("kind", "pixels") not in ("pixels", "features"):
        return f"'network.kind' is {network.get('kind')!r}, not pixels or features"
    if network.get("kind") == "features" and not _is_int(network.get("dim")):
        return "'network.dim' is missing or not a positive integer"
    if network["grid"] != data["players"]["grid"] or network["outputs"] != data["model"]["outputs"]:
        return "'network' does not match 'players' and 'model'"
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
               for v in [*data["preprocess"]["mean"], *data["preprocess"]["std"]]):
        return "'preprocess.mean' and 'preprocess.std' must be numbers"
    try:
        masking.parse_fill(data.get("fill"))
    except ValueError as exc:
        return f"'fill': {exc}"
    return None


def _state_dict_problem(data: dict[str, Any]) -> str | None:
    """A state_dict that is no mapping of tensors, or whose names and shapes are not the recorded network's."""
    state = data.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        return "'state_dict' is missing or not a mapping of tensors"
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_net(data).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - a forged size the network cannot have
        return f"its network cannot be built ({type(exc).__name__}: {exc})"
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        return (f"'state_dict' does not fit the recorded network ({wrong[0]}: {got.get(wrong[0], 'missing')} "
                f"instead of {expected.get(wrong[0], 'none')})")
    return None


def mismatches(data: dict[str, Any], *, model_fingerprint: str | None = None, outputs: int | None = None,
               arch: str | None = None, preprocess: dict[str, Any] | None = None,
               grid: int | None = None, fill: Any = None) -> list[str]:
    """Why ``data`` does not fit the run (empty: it fits). Only the given items are compared."""
    problems = []
    trained = data["model"]
    if arch is not None and trained["arch"] != arch:
        problems.append(f"it was trained for model.arch {trained['arch']!r}, the config has {arch!r}")
    if model_fingerprint is not None and trained["fingerprint"] != model_fingerprint:
        problems.append(f"it was trained for other model weights (fingerprint {trained['fingerprint'][:12]}, "
                        f"this model {model_fingerprint[:12]})")
    if outputs is not None and int(trained["outputs"]) != int(outputs):
        problems.append(f"it was trained for a model with {trained['outputs']} outputs, this one has {outputs}")
    if preprocess is not None:
        for name, value in preprocess.items():
            if data["preprocess"].get(name) != value:
                problems.append(f"preprocess.{name} is {value!r}, it was trained with {data['preprocess'].get(name)!r}")
        full = "size" in preprocess  # a whole preprocess_record (not only mean/std): its absent keys are defaults
        for name in sorted(set(data["preprocess"]) - set(preprocess)) if full else []:
            problems.append(f"preprocess.{name} is its default, it was trained with {data['preprocess'][name]!r}")
    if grid is not None and int(data["players"]["grid"]) != int(grid):
        problems.append(f"explainer.segments.grid is {grid}, it was trained for grid {data['players']['grid']}")
    if fill is not None and data["fill"] != fill:
        problems.append(f"explainer.fill is {fill!r}, it was trained with {data['fill']!r}")
    return problems


def refuse(path: Path | str, problems: list[str], source: str | None = None) -> None:
    if problems:
        raise ConfigError("explainer.checkpoint", f"{path} does not match this config: " + "; ".join(problems)
                          + " (train an explainer for this config with explain-cli train)", source)


class Explainer(base.Explainer):
    """FastSHAP: one explainer forward per batch, plus the model's v(all) and v(none)."""

    name = "amortized"
    input_only = True
    uses_background = False

    @classmethod
    def check_run(cls, config: Any, model: nn.Module, num_outputs: int) -> None:
        """Refuse (ConfigError, exit 2) a checkpoint that was trained for another model, players,
        fill or preprocessing; called by the pipeline's prepare (so ``validate`` refuses it too).
        Resolves ``explainer.checkpoint`` against the config's folder."""
        settings: Settings = config.explainer_settings
        if settings.checkpoint is None:
            raise ConfigError("explainer.checkpoint", "required: the explainer.pt written by "
                                                      "explain-cli train CONFIG --input DIR --output explainer.pt",
                              config._source)
        if config.targets.output != "logit":
            raise ConfigError("targets.output", "the amortized explainer is trained on the model's logits: "
                                                "use targets.output: logit (a contrast class is fine)", config._source)
        path = config.resolve(settings.checkpoint)
        data = load_checkpoint(path)
        refuse(path, mismatches(data, model_fingerprint=fingerprint(model), outputs=num_outputs,
                                arch=config.model.arch, preprocess=preprocess_record(config.preprocess),
                                grid=None if settings.segments is None else settings.segments.grid,
                                fill=settings.fill), config._source)
        param = next(model.parameters(), None)
        feature_map_for(data, model, config.preprocess.input_shape[0], path,
                        param.device if param is not None else "cpu", config._source)
        settings.checkpoint = str(path)

    def __init__(self, context: base.ExplainContext) -> None:
        super().__init__(context)
        settings: Settings = self.settings  # type: ignore[assignment]
        if context.layer is not None:
            raise ConfigError("model.layer", "the amortized explainer masks input patches and cannot explain "
                                             f"layer '{context.layer_name}'; set model.layer: input")
        if settings.checkpoint is None:
            raise ConfigError("explainer.checkpoint", "required: the explainer.pt written by explain-cli train")
        path = Path(settings.checkpoint)
        self.data = load_checkpoint(path)
        refuse(path, mismatches(self.data, model_fingerprint=fingerprint(context.model),
                                preprocess={"mean": [float(v) for v in context.mean],
                                            "std": [float(v) for v in context.std]},
                                grid=None if settings.segments is None else settings.segments.grid,
                                fill=settings.fill))
        self.grid = int(self.data["players"]["grid"])
        self.fill = self.data["fill"]
        self.net = build_net(self.data)
        self.net.load_state_dict(self.data["state_dict"])
        self.features: nn.Module | None = None
        self.classifier: nn.Linear | None = None
        if isinstance(self.net, FeatureNet):
            self.features, self.classifier = feature_map_for(self.data, context.model, len(context.mean), path,
                                                             context.device)
        self.net.to(context.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    @property
    def images_per_step(self) -> int:
        return max(1, int(self.context.batch_size) // 2)

    def explain(self, images: torch.Tensor, targets: BatchTargets | int, seeds: Sequence[int]) -> Attribution:
        """Explain the selected classes of each image; ``seeds`` are not used (deterministic)."""
        ctx = self.context
        targets = as_targets(targets)
        spec = targets.spec
        if spec.output != "logit":
            raise ConfigError("targets.output", f"the amortized explainer was trained on the model's logits and "
                                                f"cannot explain the {spec.output}; use targets.output: logit")
        n_images, channels, height, width = images.shape
        if len(seeds) != n_images:
            raise ValueError(f"got {len(seeds)} seeds for {n_images} images")
        size = self.data["preprocess"]["size"]
        trained = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if (height, width) != trained:
            raise ConfigError("preprocess.size", f"the explainer was trained on {trained[0]} x {trained[1]} images, "
                                                 f"got {height} x {width}")
        labels = masking.grid_labels(height, width, self.grid)
        with torch.no_grad():
            fills = masking.fill_images(images, self.fill, ctx.mean, ctx.std)
            out, features = forward_reading_features(ctx.model, torch.cat([images, fills]), int(ctx.batch_size),
                                                     self.features, 2 * n_images)
            weight = None if self.classifier is None else self.classifier.weight
            raw, none = out[:n_images], out[n_images:]
            selection = targets.select(raw)
            classes = selection.classes
            fx = targets.explained(raw, classes).double()
            fnull = targets.explained(none, classes).double()
            values = raw_values(self.net, images.float(), fills.float(), features, weight)  # (N, outputs, M)
            values = spec.outputs(values)  # a binary model's negative class: the positive values negated
            picked = values.gather(1, classes[:, :, None].expand(-1, -1, values.shape[-1])).double()
            if spec.contrast is not None:  # Shapley values are linear: logit(c) - logit(contrast)
                picked = picked - values[:, spec.contrast:spec.contrast + 1].double()
            phi = efficient(picked, fx - fnull).cpu().numpy()  # (N, k, M)
        maps = np.stack([masking.paint(phi[i].T, labels, channels) for i in range(n_images)])
        return Attribution(
            values=maps,
            **selection.attribution_fields(),
            outputs=fx.cpu().numpy().astype(np.float32),
            base_values=fnull.cpu().numpy().astype(np.float32),
            shap_sum=phi.sum(-1).astype(np.float32),
            segments=np.broadcast_to(labels, (n_images, height, width)).copy(),
        )
