"""``preprocess.transform``: the user's own eval transform (PIL image in, CHW tensor out).

It replaces our resize and normalisation, so the model sees exactly what it saw in validation.
:func:`resolve` imports it once per config and learns from one probe image what it makes: the
input shape, and the mean/std it normalises with (the last ``Normalize`` of a torchvision
``Compose``, or ``preprocess.display``). Overlays show the transformed image de-normalised, and
the masking explainers fill hidden pixels in that de-normalised space, as they do for ours.

What the transform receives: an 8-bit file as an RGB PIL image (as torchvision's ImageFolder
loader gives it), a 16-bit or float file as a PIL image of its own mode ("I;16", "I", "F"), a
.npy / multi-page TIFF as its numpy array, a DICOM as its rescaled float32 array.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from explain_cli.config import PreprocessConfig
from explain_cli.errors import ConfigError, ImageError

KEY = "preprocess.transform"
#: Callables by (spec, folder): a transform is imported once per process.
_LOADED: dict[tuple[str, str], Callable[[Any], Any]] = {}


def _import(spec: str, base_dir: Path, source: str) -> Callable[[Any], Any]:
    from explain_cli.models import _importable, import_callable

    with _importable(base_dir):
        return import_callable(spec.partition(":")[2], KEY, base_dir, "transform", source)


def find_normalize(fn: Any) -> tuple[list[float], list[float]] | None:
    """(mean, std) of the last Normalize step of a torchvision (v1 or v2) Compose, nested ones
    included; None when there is none."""
    found = None
    for step in getattr(fn, "transforms", None) or []:
        inner = find_normalize(step)
        if inner is not None:
            found = inner
        elif type(step).__name__ == "Normalize" and hasattr(step, "mean") and hasattr(step, "std"):
            found = ([float(v) for v in np.atleast_1d(np.asarray(step.mean, np.float64))],
                     [float(v) for v in np.atleast_1d(np.asarray(step.std, np.float64))])
    return found


def _as_chw(out: Any) -> np.ndarray:
    import torch

    if isinstance(out, torch.Tensor):
        out = out.detach().cpu().float().numpy()
    arr = np.asarray(out, dtype=np.float32)
    if arr.ndim != 3:
        raise ImageError(f"{KEY} returned shape {tuple(arr.shape)}, not a (C, H, W) tensor")
    return np.ascontiguousarray(arr)


def resolve(cfg: PreprocessConfig, base_dir: Path, source: str = "") -> None:
    """Import the transform and record what it makes (cfg.input_shape, cfg.norm); exit-2 errors
    name the key."""
    assert cfg.transform is not None
    key = (cfg.transform, str(base_dir))
    fn = _LOADED.get(key) or _import(cfg.transform, base_dir, source)
    _LOADED[key] = fn
    try:
        probe = _as_chw(fn(Image.new("RGB", (512, 384), (128, 128, 128))))
    except ImageError as exc:
        raise ConfigError(KEY, f"on a 512 x 384 RGB probe image: {exc}", source) from None
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise ConfigError(KEY, f"failed on a 512 x 384 RGB probe image: {type(exc).__name__}: {exc}",
                          source) from None
    channels = probe.shape[0]
    if cfg.display is not None:
        mean, std = list(cfg.display.mean), list(cfg.display.std)
        where = "preprocess.display"
    else:
        found = find_normalize(fn)
        if found is None:
            raise ConfigError("preprocess.display", f"{cfg.transform} has no torchvision Normalize step: give "
                                                    f"preprocess.display: {{mean: [...], std: [...]}} (what it "
                                                    f"normalises with; [0]*C and [1]*C if it does not)", source)
        mean, std = found
        where = "its Normalize"
    if len(mean) == 1 and channels > 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels:
        raise ConfigError("preprocess.display", f"{where} has {len(mean)} mean / {len(std)} std values, the "
                                                f"transform makes {channels} channels", source)
    if not all(s > 0 for s in std):
        raise ConfigError("preprocess.display", f"{where}: std values must be > 0 (got {std})", source)
    cfg._resolved = {"input_shape": tuple(int(v) for v in probe.shape), "mean": mean, "std": std,
                     "callable": fn}


def transform_input(raw: Any) -> Any:
    """What the transform receives for one decoded file (see the module docstring)."""
    from explain_cli.images import HIGH_DEPTH_MODES, _to_rgb

    if isinstance(raw, Image.Image) and raw.mode not in HIGH_DEPTH_MODES:
        return _to_rgb(raw)
    return raw


def apply_transform(raw: Any, cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(display uint8 HxWx3, model input float32 CxHxW) of one decoded file through the transform."""
    from explain_cli.images import display_pixels

    resolved = cfg._resolved
    if resolved is None:
        raise RuntimeError("preprocess.transform used before config.finish resolved it")
    try:
        x = _as_chw(resolved["callable"](transform_input(raw)))
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(f"out of memory in {KEY}") from None
    except Exception as exc:  # noqa: BLE001 - the user's code failing on one image is that image's error
        raise ImageError(f"{KEY} failed: {type(exc).__name__}: {exc}") from None
    if tuple(x.shape) != tuple(resolved["input_shape"]):
        raise ImageError(f"{KEY} made {tuple(x.shape)}, other images {tuple(resolved['input_shape'])}: the "
                         f"transform must resize to a fixed size (a batch needs one shape)")
    mean = np.asarray(resolved["mean"], np.float32)[:, None, None]
    std = np.asarray(resolved["std"], np.float32)[:, None, None]
    unit = np.moveaxis(x * std + mean, 0, -1)
    return display_pixels(unit, cfg), x
