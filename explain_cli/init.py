"""``explain-cli init MODEL``: a commented starter config, so a first config is not typed from the
README. The model is built once (as the config will build it) to fill in what can be measured: the
class count, the preprocessing the weights were trained with, and the layers that can be explained.

Every value is written as YAML that reads back as itself (a folder named ``photos #1`` or ``yes``
would otherwise become ``photos`` or ``True``): the text is read back and compared with what was
meant before the file exists, and a config that does not validate is never left behind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml

from explain_cli.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from explain_cli.errors import ConfigError, UserError

log = logging.getLogger("explain_cli")

#: Layers listed in the starter config: the explainable ones at most this deep (layer4, layer4.0).
LISTED_DEPTH = 1
MAX_LISTED = 40


def _rel(path: Path, base: Path) -> str:
    """``path`` as the config will read it: relative to the config's folder where possible (``./~x``
    for a folder named ``~x``, which the config would otherwise expand to a home folder)."""
    try:
        rel = os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive
        return str(path.resolve())
    if rel.startswith(".."):
        return str(path.resolve())
    return f"./{rel}" if rel.startswith("~") else rel


def yaml_value(value: Any) -> str:
    """``value`` as YAML that reads back as ``value`` after ``key: `` and before a ``# comment``:
    plain where that is faithful (``images``), double-quoted otherwise (``"photos #1"``, ``"yes"``)."""
    from explain_cli.config import safe_yaml

    if isinstance(value, str):
        try:
            if safe_yaml(f"k: {value}   # c") == {"k": value}:
                return value
        except Exception:  # noqa: BLE001 - any parse problem means: quote it
            pass
        return yaml.safe_dump(value, default_style='"', allow_unicode=True, width=1 << 30).rstrip("\n")
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=1 << 30)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment(text: str) -> str:
    """``text`` for a ``#`` comment line: characters that would end the line are escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _model_config(what: str, **values: Any) -> ModelConfig:
    """ModelConfig, with pydantic's complaint as a ConfigError naming the command-line argument."""
    from pydantic import ValidationError

    try:
        return ModelConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = str(first.get("msg", exc)).removeprefix("Value error, ")
        raise ConfigError(what, f"{values.get('arch')!r}: {message}") from None


def _guess_classes(checkpoint: Path, cfg: ModelConfig) -> int | None:
    """The class count of a checkpoint: the rows of its last 2-D weight (the classifier)."""
    from explain_cli.models import _read_checkpoint

    state = _read_checkpoint(checkpoint, cfg)
    last = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "dim", lambda: 0)() == 2]
    return int(last[-1].shape[0]) if last else None


def _preprocess(arch: str, pretrained: bool, resize: str | None = None) -> tuple[dict[str, Any], str, str | None]:
    """The preprocessing to write, why (the comment on ``resize``) and where the library's values came
    from (None: explain-cli's defaults). The library's pretrained weights get their own evaluation
    transform (size, centre crop, interpolation, mean, std: explain_cli/preprocess_check.py); anything
    else, a custom checkpoint above all, is stretched unless ``resize`` says otherwise: its training
    transform is unknown, and a crop would silently zoom in on every image and cut its borders (a
    224 px tile loses 12.5 % of each side)."""
    from explain_cli.preprocess_check import library_preprocess

    source = arch.partition(":")[0]
    library = pretrained and source in ("torchvision", "timm")
    out: dict[str, Any] = {"size": 224, "resize": "crop", "crop_fraction": 0.875, "interpolation": "bilinear",
                           "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    # without metadata (or weights of its own): the ImageNet mean and std, the usual start of fine-tuning
    found = library_preprocess(arch) if library else None
    if found is not None:
        out.update(found[0])
        out["_notes"] = found[2]
    chosen = resize or ("crop" if library else "stretch")
    if chosen == "stretch":
        del out["crop_fraction"]
    if resize is not None:
        why = "as asked (--resize)"
    elif library:
        why = f"the evaluation transform of {arch}'s pretrained weights"
    else:
        why = ("custom weights: their training transform is unknown, and a centre crop would cut every "
               "image's borders; use crop (--resize crop) if the model was trained on centre crops")
    out["resize"] = chosen
    return out, why, None if found is None else found[1]


def _model_source(model: str, arch: str | None, weights: str, library: bool
                  ) -> tuple[str, str, str | None, str | None]:
    """(arch, the option that named it, the weights to write, the checkpoint file) of ``model``: a
    library or python: architecture, or a checkpoint file with ``--arch`` (UserError otherwise)."""
    from explain_cli.models import _is_torchscript

    if library or model.startswith("python:"):
        if arch is not None:
            raise UserError("init: --arch goes with a checkpoint file; MODEL is already an architecture")
        return model, "MODEL", weights if library else None, None
    path = Path(model)
    if not path.is_file():
        raise UserError(f"init: MODEL must be torchvision:NAME, timm:NAME, python:pkg.module:factory or a "
                        f"checkpoint file; {path} is none of them")
    if arch is None and _is_torchscript(path):
        arch = "torchscript"
    if arch is None:
        raise UserError(f"init: {path} is a checkpoint: give its architecture with --arch "
                        "(e.g. --arch torchvision:resnet50)")
    return arch, "--arch", None, str(path.resolve())


def _shapes_config(what: str, arch: str, checkpoint: str | None, num_classes: int | None, chosen: str | None
                   ) -> tuple[Any, int | None]:
    """The model config that builds the network for its shapes (random weights for pretrained ones),
    and the number of classes: a checkpoint's head decides it when it builds."""
    from explain_cli.models import build_model

    shapes_cfg = _model_config(what, arch=arch, checkpoint=checkpoint, num_classes=num_classes,
                               weights="random" if chosen == "pretrained" else chosen)
    if checkpoint is None or num_classes is not None or arch == "torchscript":
        return shapes_cfg, num_classes
    guess = _guess_classes(Path(checkpoint), shapes_cfg)
    if guess is not None:
        try:
            build_model(_model_config(what, arch=arch, checkpoint=checkpoint, num_classes=guess),
                        lambda p: Path(p))
            num_classes = guess
        except ConfigError:
            pass  # the architecture's own count fits, or nothing does (reported below)
    return _model_config(what, arch=arch, checkpoint=checkpoint, num_classes=num_classes), num_classes


def _layer_lines(net: Any, size: Any) -> tuple[str, str]:
    """The comment lines listing the layers a gradient or deep run may explain (the shallow ones),
    and the line counting the deeper ones ('' when none is left out)."""
    from explain_cli.models import layer_table

    rows = [r for r in layer_table(net, size) if not r.problem and r.name != "input"]
    shallow = [r for r in rows if r.name.count(".") < LISTED_DEPTH + 1]
    listed = "\n".join(
        _comment(f"#   {r.name:<28} explains {'x'.join(map(str, r.input_shape[1:])):<14} "
                 f"map {r.map_size[0]}x{r.map_size[1]}")
        for r in shallow[:MAX_LISTED])
    more = f"\n#   ... and {len(rows) - min(len(shallow), MAX_LISTED)} deeper ones" if len(rows) > len(shallow[:MAX_LISTED]) else ""
    return listed, more


def _model_lines(arch: str, checkpoint: str | None, chosen: str | None, num_classes: int | None,
                 base: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``model:`` section: what it means and its lines."""
    meant_model: dict[str, Any] = {"arch": arch}
    model_lines = [f"  arch: {yaml_value(arch)}"]
    if checkpoint is not None:
        meant_model["checkpoint"] = _rel(Path(checkpoint), base)
        model_lines.append(f"  checkpoint: {yaml_value(meant_model['checkpoint'])}   # relative to this file's folder")
    if chosen is not None:
        meant_model["weights"] = chosen
        why = ("the library's pretrained weights, from the local torch hub / Hugging Face cache (never downloaded)"
               if chosen == "pretrained" else "untrained: for tests only, the maps explain noise")
        model_lines.append(f"  weights: {yaml_value(chosen)}   # {why}")
    if num_classes is not None:
        meant_model["num_classes"] = num_classes
        model_lines.append(f"  num_classes: {yaml_value(num_classes)}")
    meant_model["layer"] = "input"
    return meant_model, model_lines


def _labels_line(outputs: int) -> str:
    if outputs == 1000:
        return "labels: null   # 1000 outputs: the ImageNet class names torchvision ships"
    if outputs == 1:
        return ("labels: null   # 1 output (a sigmoid): give a file of its class name, or of two names "
                "(negative, then positive) to name both classes")
    return f"labels: null   # {outputs} outputs: give a file of {outputs} names (one per line) to replace 'class 0', ..."


def _resize_lines(pre: dict[str, Any], resize_why: str, from_model: str, pre_notes: dict[str, Any]) -> str:
    if pre["resize"] == "crop":
        return (f"  resize: crop   # {_comment(resize_why)}: short side to size / crop_fraction, then the "
                f"centre size x size\n  crop_fraction: {yaml_value(pre['crop_fraction'])}{from_model}"
                + (f" ({_comment(pre_notes['crop_fraction'])})" if "crop_fraction" in pre_notes else ""))
    return f"  resize: stretch   # the whole image to size x size; {_comment(resize_why)}"


def starter_config(model: str, arch: str | None, config_path: Path, input_dir: Path,
                   num_classes: int | None = None, weights: str = "pretrained", resize: str | None = None
                   ) -> tuple[str, dict[str, Any], list[str]]:
    """The text of a starter config for ``model`` (torchvision:NAME, timm:NAME, python:mod:factory,
    or a checkpoint file with ``arch``), the data it means (what loading the text must give) and
    notes for the user; ConfigError when the model cannot be built as written.

    Longer than 60 lines on purpose: most of it is the config's text as one template, which reads
    best whole (the decisions before it are in the helpers above)."""
    from explain_cli.models import build_model, count_outputs, pretrained_file

    base = config_path.parent
    notes: list[str] = []
    library = model.startswith(("torchvision:", "timm:"))
    arch, what, chosen, checkpoint = _model_source(model, arch, weights, library)
    shapes_cfg, num_classes = _shapes_config(what, arch, checkpoint, num_classes, chosen)
    if chosen == "pretrained":
        try:
            notes.append(f"pretrained weights: {pretrained_file(arch)}")
        except ConfigError as exc:
            notes.append(f"validate and run will fail until the weights are there: {exc.message}")
    pre, resize_why, origin = _preprocess(arch, chosen == "pretrained", resize)
    pre_notes = pre.pop("_notes", {})
    net = build_model(shapes_cfg, lambda p: Path(p))  # as the config will build it (pretrained: its shape)
    outputs = count_outputs(net, pre["size"])
    listed, more = _layer_lines(net, pre["size"])
    meant_model, model_lines = _model_lines(arch, checkpoint, chosen, num_classes, base)
    meant_input = _rel(input_dir, base)
    labels = _labels_line(outputs)
    top_k = min(2, outputs)
    top_k_why = ("explain the 2 highest-scoring classes" if top_k == 2 else
                 "one output: the sigmoid's class (the only one)")
    pre_why = ("as the weights were trained (from the library's metadata)" if library and chosen == "pretrained"
               else "check against how the model was trained: size, mean and std are ImageNet's")
    from_model = f"   # from {_comment(origin)}" if origin else ""
    resize_lines = _resize_lines(pre, resize_why, from_model, pre_notes)
    name = _comment(config_path.name)
    command = _comment(f"{model}{f' --arch {arch}' if checkpoint else ''}")
    text = f"""# Starter config written by `explain-cli init {command}`.
# Check it:  explain-cli validate {name}
# Run it:    explain-cli run {name}
# Every key and its default: docs/first-hour.md and docs/config-reference.md.
# Relative paths resolve against this file's folder.

model:
{chr(10).join(model_lines)}
  layer: input   # explain the pixels; or the input of one of these layers (gradient, deep):
{listed}{more}
#   (all of them, with shapes: explain-cli layers {name})
{labels}
preprocess:                # {pre_why}
  size: {yaml_value(pre['size'])}{from_model or "   # one side, or [height, width]"}
{resize_lines}
  interpolation: {yaml_value(pre['interpolation'])}{from_model or "   # bilinear | bicubic | nearest"}
  mean: {yaml_value(pre['mean'])}{from_model or "   # ImageNet's (the default)"}
  std: {yaml_value(pre['std'])}{from_model or "   # ImageNet's (the default)"}
input:
  dir: {yaml_value(meant_input)}   # your images, walked recursively
  exclude: []   # e.g. ["*-02*"] to skip files by name
background:
  from_input: 20   # reference images sampled from input.dir (more: smoother maps, slower)
explainer:
  name: gradient   # gradient | deep | partition | kernel (switch with --explainer NAME)
  nsamples: 100    # samples per image: more is less noisy and slower
output:
  dir: out
  format: svg      # svg | png
  top_k: {top_k}         # {top_k_why}
batch_size: auto   # model evaluations per forward pass: 64 on CPU, the largest that fits on CUDA
device: auto       # CUDA when available, else CPU
seed: 0
"""
    meant = {"model": meant_model, "labels": None, "preprocess": pre,
             "input": {"dir": meant_input, "exclude": []}, "background": {"from_input": 20},
             "explainer": {"name": "gradient", "nsamples": 100},
             "output": {"dir": "out", "format": "svg", "top_k": top_k},
             "batch_size": "auto", "device": "auto", "seed": 0}
    return text, meant, notes


def _first_difference(read: Any, meant: Any, key: str = "") -> str | None:
    """The dotted key where ``read`` differs from ``meant`` (None when they are equal)."""
    if isinstance(meant, dict) and isinstance(read, dict):
        for k in dict.fromkeys([*meant, *read]):
            found = _first_difference(read.get(k), meant.get(k), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    same = read == meant and type(read) is type(meant)
    return None if same else f"{key or '(top level)'}: {meant!r} would read back as {read!r}"


def check_target(output: Path, force: bool, option: str = "--output") -> None:
    """Refuse, before any model work, a config file ``output`` that could not be written: an existing
    file without --force, a folder, a path below a file, an unwritable or read-only folder."""
    from explain_cli.config import check_output_dir

    temporary = f".{output.name}.init-{os.getpid()}.yaml"  # what write_starter writes first
    if len(os.fsencode(temporary)) > 255:  # NAME_MAX of common file systems
        raise UserError(f"{option}: the file name {output.name!r} is too long")
    try:
        if output.is_dir():
            raise UserError(f"{option}: {output} is a folder; give the config file, e.g. {output / 'explain.yaml'}")
        if (output.exists() or output.is_symlink()) and not force:
            raise UserError(f"{output} exists; choose another {option} or add --force")
    except OSError as exc:  # a parent we may not stat
        raise UserError(f"{option}: cannot use {output}: {exc.strerror or exc}") from None
    check_output_dir(output.parent, key=option)


def write_starter(model: str, arch: str | None, output: Path, input_dir: Path, num_classes: int | None = None,
                  weights: str = "pretrained", force: bool = False, resize: str | None = None) -> list[str]:
    """Write the starter config to ``output`` and return the notes for the user. Nothing is written
    unless the text reads back as the values meant and validates (UserError, exit 2, otherwise)."""
    from explain_cli.config import _YamlRefusal, load_config, safe_yaml

    check_target(output, force)
    text, meant, notes = starter_config(model, arch, output.absolute(), input_dir, num_classes, weights, resize)
    try:
        read = safe_yaml(text)
    except (yaml.YAMLError, _YamlRefusal) as exc:
        raise UserError(f"init: the starter config for {model!r} is not valid YAML ({exc}); nothing written") from None
    wrong = _first_difference(read, meant)
    if wrong:
        raise UserError(f"init: cannot write a faithful config ({wrong}); nothing written")
    created = []
    parent = output.absolute().parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    tmp = output.absolute().parent / f".{output.name}.init-{os.getpid()}.yaml"  # as check_target tried
    try:
        output.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        try:
            load_config(tmp)  # the schema accepts what was written
        except ConfigError as exc:
            raise ConfigError(exc.key, exc.message, str(output)) from None
        os.replace(tmp, output)
    except OSError as exc:
        raise UserError(f"--output: cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
        if not output.exists():
            for folder in created:  # innermost first: only the folders this call made, if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
    return notes
