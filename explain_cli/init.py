"""``explain-cli init MODEL``: a commented starter config, so a first config is not typed from the
README. The model is built once (as the config will build it) to fill in what can be measured: the
class count, the preprocessing the weights were trained with, and the layers that can be explained.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from explain_cli.config import IMAGENET_MEAN, IMAGENET_STD, ModelConfig
from explain_cli.errors import ConfigError, UserError

log = logging.getLogger("explain_cli")

#: Layers listed in the starter config: the explainable ones at most this deep (layer4, layer4.0).
LISTED_DEPTH = 1
MAX_LISTED = 40


def _rel(path: Path, base: Path) -> str:
    """``path`` as the config will read it: relative to the config's folder where possible."""
    try:
        rel = os.path.relpath(path.resolve(), base.resolve())
    except ValueError:  # another drive
        return str(path.resolve())
    return str(path.resolve()) if rel.startswith("..") else rel


def _guess_classes(checkpoint: Path, cfg: ModelConfig) -> int | None:
    """The class count of a checkpoint: the rows of its last 2-D weight (the classifier)."""
    from explain_cli.models import _read_checkpoint

    state = _read_checkpoint(checkpoint, cfg)
    last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(last[-1].shape[0]) if last else None


def _preprocess(arch: str, pretrained: bool) -> dict[str, Any]:
    """The evaluation preprocessing of the library's pretrained weights (ImageNet's otherwise)."""
    source, _, name = arch.partition(":")
    out: dict[str, Any] = {"size": 224, "resize": "crop", "crop_fraction": 0.875,
                           "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    try:
        if source == "timm":
            import timm.models

            cfg = timm.models.get_pretrained_cfg(name)
            if cfg is not None:
                out.update(size=int(cfg.input_size[-1]), crop_fraction=float(cfg.crop_pct or 0.875),
                           mean=[round(float(m), 4) for m in cfg.mean], std=[round(float(s), 4) for s in cfg.std])
        elif source == "torchvision" and pretrained:
            import torchvision.models

            transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
            crop = int(transforms.crop_size[0])
            out.update(size=crop, crop_fraction=round(crop / int(transforms.resize_size[0]), 4),
                       mean=[float(m) for m in transforms.mean], std=[float(s) for s in transforms.std])
    except Exception:  # noqa: BLE001 - a model without metadata keeps the ImageNet defaults
        pass
    return out


def starter_config(model: str, arch: str | None, config_path: Path, input_dir: Path,
                   num_classes: int | None = None, weights: str = "pretrained") -> tuple[str, list[str]]:
    """The text of a starter config for ``model`` (torchvision:NAME, timm:NAME, python:mod:factory,
    or a checkpoint file with ``arch``) and notes for the user; ConfigError when the model cannot
    be built as written."""
    from explain_cli.models import _is_torchscript, build_model, count_outputs, layer_table, pretrained_file

    base = config_path.parent
    notes: list[str] = []
    checkpoint: str | None = None
    library = model.startswith(("torchvision:", "timm:"))
    if library or model.startswith("python:"):
        if arch is not None:
            raise UserError("init: --arch goes with a checkpoint file; MODEL is already an architecture")
        arch = model
        chosen = weights if library else None
    else:
        path = Path(model)
        if not path.is_file():
            raise UserError(f"init: MODEL must be torchvision:NAME, timm:NAME, python:pkg.module:factory or a "
                            f"checkpoint file; {path} is none of them")
        if arch is None and _is_torchscript(path):
            arch = "torchscript"
        if arch is None:
            raise UserError(f"init: {path} is a checkpoint: give its architecture with --arch "
                            "(e.g. --arch torchvision:resnet50)")
        checkpoint, chosen = str(path.resolve()), None
    shapes_cfg = ModelConfig(arch=arch, checkpoint=checkpoint, num_classes=num_classes,
                             weights="random" if chosen == "pretrained" else chosen)
    if checkpoint is not None and num_classes is None and arch != "torchscript":
        guess = _guess_classes(Path(checkpoint), shapes_cfg)
        if guess is not None:
            try:
                build_model(ModelConfig(arch=arch, checkpoint=checkpoint, num_classes=guess), lambda p: Path(p))
                num_classes = guess
            except ConfigError:
                pass  # the architecture's own count fits, or nothing does (reported below)
        shapes_cfg = ModelConfig(arch=arch, checkpoint=checkpoint, num_classes=num_classes)
    if chosen == "pretrained":
        try:
            notes.append(f"pretrained weights: {pretrained_file(arch)}")
        except ConfigError as exc:
            notes.append(f"validate and run will fail until the weights are there: {exc.message}")
    pre = _preprocess(arch, chosen == "pretrained")
    net = build_model(shapes_cfg, lambda p: Path(p))  # as the config will build it (pretrained: its shape)
    outputs = count_outputs(net, pre["size"])
    rows = [r for r in layer_table(net, pre["size"]) if not r.problem and r.name != "input"]
    shallow = [r for r in rows if r.name.count(".") < LISTED_DEPTH + 1]
    listed = "\n".join(
        f"#   {r.name:<28} explains {'x'.join(map(str, r.input_shape[1:])):<14} map {r.map_size[0]}x{r.map_size[1]}"
        for r in shallow[:MAX_LISTED])
    more = f"\n#   ... and {len(rows) - min(len(shallow), MAX_LISTED)} deeper ones" if len(rows) > len(shallow[:MAX_LISTED]) else ""

    model_lines = [f"  arch: {arch}"]
    if checkpoint is not None:
        model_lines.append(f"  checkpoint: {_rel(Path(checkpoint), base)}   # relative to this file's folder")
    if chosen is not None:
        why = ("the library's pretrained weights, from the local torch hub / Hugging Face cache (never downloaded)"
               if chosen == "pretrained" else "untrained: for tests only, the maps explain noise")
        model_lines.append(f"  weights: {chosen}   # {why}")
    if num_classes is not None:
        model_lines.append(f"  num_classes: {num_classes}")
    labels = ("labels: null   # 1000 outputs: the ImageNet class names torchvision ships" if outputs == 1000 else
              f"labels: null   # {outputs} outputs: give a file of {outputs} names (one per line) to replace 'class 0', ...")
    text = f"""# Starter config written by `explain-cli init {model}`{f' --arch {arch}' if checkpoint else ''}.
# Check it:  explain-cli validate {config_path.name}
# Run it:    explain-cli run {config_path.name}
# Every key and its default: docs/first-hour.md and the README's config reference.
# Relative paths resolve against this file's folder.

model:
{chr(10).join(model_lines)}
  layer: input   # explain the pixels; or the input of one of these layers (gradient, deep):
{listed}{more}
#   (all of them, with shapes: explain-cli layers {config_path.name})
{labels}
preprocess:                # as the weights were trained (from the library's metadata where it has some)
  size: {pre['size']}
  resize: {pre['resize']}   # short side to size / crop_fraction, then the centre size x size
  crop_fraction: {pre['crop_fraction']}
  mean: {pre['mean']}
  std: {pre['std']}
input:
  dir: {_rel(input_dir, base)}   # your images, walked recursively
  exclude: []   # e.g. ["*-02*"] to skip files by name
background:
  from_input: 20   # reference images sampled from input.dir (more: smoother maps, slower)
explainer:
  name: gradient   # gradient | deep | partition | kernel (switch with --explainer NAME)
  nsamples: 100    # samples per image: more is less noisy and slower
output:
  dir: out
  format: svg      # svg | png
  top_k: 2         # explain the 2 highest-scoring classes
batch_size: auto   # model evaluations per forward pass: 64 on CPU, the largest that fits on CUDA
device: auto       # CUDA when available, else CPU
seed: 0
"""
    return text, notes
