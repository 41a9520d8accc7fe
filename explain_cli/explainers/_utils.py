"""Batching and hook helpers shared by the explainers (hooks are always removed in ``finally``)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


def chunk_ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering ``range(total)`` in pieces of at most ``size``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


def model_chunks(ctx, total: int) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges covering ``range(total)``, one model call each, at ``ctx.batch_size``
    rows; while the CPU ``auto`` probe measures, at its planned sizes, each call timed (the loop
    body between two ranges is the call; see ``explain_cli.autobatch``)."""
    from explain_cli.autobatch import call_size, timed_call

    start = 0
    while start < total:
        stop = min(total, start + call_size(ctx))
        with timed_call(ctx, stop - start):
            yield start, stop
        start = stop


def as_2d(out: torch.Tensor) -> torch.Tensor:
    """Model output as (rows, outputs): a 1-D output is one output per row."""
    if out.dim() == 1:
        return out[:, None]
    return out.reshape(out.shape[0], -1)


def forward_in_chunks(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Model outputs (rows, outputs) for ``inputs``, ``batch_size`` rows per call, without autograd."""
    size = max(1, int(batch_size))
    with torch.no_grad():
        return torch.cat([as_2d(model(inputs[a:b])) for a, b in chunk_ranges(inputs.shape[0], size)])


def rank_outputs(outputs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k classes on the raw model output (as shap's ranked_outputs) and their softmax probabilities."""
    k = min(top_k, outputs.shape[1])
    classes = torch.argsort(outputs, dim=1, descending=True, stable=True)[:, :k]
    probabilities = torch.softmax(outputs.float(), dim=1).gather(1, classes)
    return classes, probabilities


class LayerInput:
    """Holds the input of a target layer captured during a forward pass (a tensor, or whatever the
    layer was given, e.g. a list, for ``captured_feature_map`` to refuse)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | list | tuple | None = None


def captured_feature_map(captured: LayerInput, layer_name: str, explainer: str) -> torch.Tensor:
    """The captured layer input: a 4-D (N, C, H, W) map or a 3-D (N, tokens, C) token sequence.

    ConfigError when the layer was not called or takes something else (``check_layer_input``
    refuses those at validate already; this is the guard for callers of the explainers alone).
    """
    from explain_cli.errors import ConfigError

    target = captured.value
    if target is None:
        raise ConfigError("model.layer", f"layer '{layer_name}' was not called in the model's forward pass")
    if not isinstance(target, torch.Tensor):
        raise ConfigError("model.layer", not_a_tensor_message(layer_name, target, []))
    if target.dim() not in (3, 4):
        raise ConfigError("model.layer", wrong_rank_message(layer_name, tuple(target.shape), explainer))
    return target


def wrong_rank_message(layer_name: str, shape: tuple, explainer: str) -> str:
    return (f"the input of layer '{layer_name}' has shape {shape} (with the batch first); the {explainer} "
            "explainer needs a 4-D (N, C, H, W) feature map or a 3-D (N, tokens, C) token sequence: "
            "choose a convolutional or transformer-block layer, or 'input'")


def not_a_tensor_message(layer_name: str, value: object, suggestions: list[str]) -> str:
    what = f"a {type(value).__name__}"
    if isinstance(value, (list, tuple)):
        items = "tensors" if all(isinstance(v, torch.Tensor) for v in value) else "items"
        what = f"a {type(value).__name__} of {len(value)} {items}"
    hint = f"choose one of its submodules that takes a single tensor ({', '.join(suggestions)}), " if suggestions \
        else "choose one of its submodules, "
    return (f"layer '{layer_name}' takes {what} as its input, not a single tensor: gradient and deep explain "
            f"one tensor; {hint}or run `explain-cli layers CONFIG` to list the layers")


@dataclass(frozen=True)
class TokenGrid:
    """How a (..., tokens, C) sequence lies on the patch grid: the first ``prefix`` tokens (class,
    distillation, register) are dropped and the rest are the grid's cells in row-major order (as
    timm's and torchvision's patch embeddings flatten them)."""

    prefix: int
    grid: tuple[int, int]
    found: str  # where the numbers come from, for the log and run.json
    assumed: bool = False  # True when inferred from the token count alone

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., tokens, C) -> (..., C, h, w), prefix tokens dropped."""
        h, w = self.grid
        patches = tokens[..., self.prefix:, :]
        return patches.reshape(*tokens.shape[:-2], h, w, tokens.shape[-1]).movedim(-1, -3)

    def describe(self) -> dict:
        """The run.json entry ``layer_tokens``."""
        return {"prefix_tokens_dropped": self.prefix, "grid": list(self.grid), "from": self.found,
                "assumed": self.assumed}


def _ancestors(model: torch.nn.Module, layer_name: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """The modules that contain ``layer_name``, nearest first, ending with the model itself."""
    parts = layer_name.split(".")
    for n in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:n])
        try:
            yield name, model.get_submodule(name) if name else model
        except AttributeError:
            continue


def _grid_of(module: torch.nn.Module) -> tuple[tuple[int, int], str] | None:
    """The patch grid a model module declares: timm's ``patch_embed.grid_size`` (``stem`` in the
    MLP-Mixer), torchvision ViT's ``image_size // patch_size``."""
    for attr in ("patch_embed", "stem"):
        grid = getattr(getattr(module, attr, None), "grid_size", None)
        if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, int) for g in grid):
            return (int(grid[0]), int(grid[1])), f"{attr}.grid_size"
    image, patch = getattr(module, "image_size", None), getattr(module, "patch_size", None)
    if isinstance(image, int) and isinstance(patch, int) and patch > 0 \
            and isinstance(getattr(module, "class_token", None), torch.Tensor):
        return (image // patch, image // patch), "image_size // patch_size"
    return None


def _prefix_of(module: torch.nn.Module) -> tuple[int, str] | None:
    """How many non-patch tokens a model module puts in front: timm's ``num_prefix_tokens``,
    torchvision ViT's ``class_token``; 0 for a model with a patch grid and neither."""
    count = getattr(module, "num_prefix_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count, "num_prefix_tokens"
    if isinstance(getattr(module, "class_token", None), torch.Tensor):
        return 1, "class_token"
    return None


def token_grid(model: torch.nn.Module, layer_name: str, tokens: int) -> TokenGrid:
    """Map the ``tokens`` of the input of ``layer_name`` onto the patch grid, from what the model
    (or the nearest module containing the layer) declares; otherwise, if the token count minus the
    known prefix is a perfect square, that square (``assumed``). ConfigError when neither works."""
    from explain_cli.errors import ConfigError

    prefix: tuple[int, str] | None = None
    grid: tuple[tuple[int, int], str] | None = None
    for _, module in _ancestors(model, layer_name):
        if prefix is None:
            prefix = _prefix_of(module)
        if grid is None:
            grid = _grid_of(module)
            if grid is not None and prefix is None and _prefix_of(module) is None:
                prefix = (0, f"no class token on {type(module).__name__}")
        if prefix is not None and grid is not None:
            break
    count = prefix[0] if prefix is not None else 0
    if grid is not None and count + grid[0][0] * grid[0][1] == tokens:
        return TokenGrid(count, grid[0], f"{prefix[1] if prefix else 'no prefix'}, {grid[1]}")
    side = math.isqrt(max(tokens - count, 0))
    if side > 0 and side * side == tokens - count:
        why = prefix[1] if prefix is not None else "none declared by the model"
        return TokenGrid(count, (side, side), f"prefix tokens: {why}; square grid from the token count",
                         assumed=True)
    declared = (f"the model declares {count} prefix token(s) ({prefix[1]})" if prefix is not None
                else "the model declares no prefix-token count")
    if grid is not None:
        declared += f" and a {grid[0][0]}x{grid[0][1]} patch grid ({grid[1]})"
    raise ConfigError("model.layer", f"the input of layer '{layer_name}' is a sequence of {tokens} tokens that "
                                     f"cannot be mapped onto a patch grid: {declared}, and {tokens} - {count} "
                                     "is not a square number; choose a layer whose input is a "
                                     "(N, C, H, W) feature map or a ViT block, or 'input'")


def layer_map(values: torch.Tensor, model: torch.nn.Module, layer_name: str) -> torch.Tensor:
    """Per-image attributions (N, k, *layer input shape) as (N, k, C, h, w): a token layer's
    (N, k, tokens, C) goes onto the patch grid, its prefix tokens dropped; a feature map's or the
    input's (N, k, C, H, W) is returned as it is."""
    if values.dim() != 4:
        return values
    return token_grid(model, layer_name, values.shape[2]).to_map(values).contiguous()


@contextmanager
def capture_layer_input(layer: torch.nn.Module, make_leaf: bool = False) -> Iterator[LayerInput]:
    """Record the first positional input of ``layer`` on every forward.

    With ``make_leaf`` the input is replaced by a detached leaf that requires grad, so gradients can
    be taken with respect to it while the part of the network in front of the layer builds no graph.
    """
    captured = LayerInput()

    def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
        first = args[0]
        if make_leaf and isinstance(first, torch.Tensor):
            first = first.detach().requires_grad_(True)
            captured.value = first
            return (first,) + tuple(args[1:])
        captured.value = first
        return None

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Turn off parameter gradients for the duration (we only need input/layer gradients)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
