"""Batching and hook helpers shared by the explainers (hooks are always removed in ``finally``)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def chunk_ranges(total: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering ``range(total)`` in pieces of at most ``size``."""
    for start in range(0, total, size):
        yield start, min(start + size, total)


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
    """Holds the input tensor of a target layer captured during a forward pass."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


def captured_feature_map(captured: LayerInput, layer_name: str, explainer: str) -> torch.Tensor:
    """The captured layer input, which must exist and be a 4-D (N, C, H, W) map; ConfigError otherwise."""
    from explain_cli.errors import ConfigError

    target = captured.value
    if target is None:
        raise ConfigError("model.layer", f"layer '{layer_name}' was not called in the model's forward pass")
    if target.dim() != 4:
        raise ConfigError(
            "model.layer",
            f"the input of layer '{layer_name}' has shape {tuple(target.shape)} (with the batch first); "
            f"the {explainer} explainer needs a 4-D (N, C, H, W) feature map: choose a convolutional "
            "layer, or 'input'")
    return target


@contextmanager
def capture_layer_input(layer: torch.nn.Module, make_leaf: bool = False) -> Iterator[LayerInput]:
    """Record the first positional input of ``layer`` on every forward.

    With ``make_leaf`` the input is replaced by a detached leaf that requires grad, so gradients can
    be taken with respect to it while the part of the network in front of the layer builds no graph.
    """
    captured = LayerInput()

    def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
        first = args[0]
        if make_leaf:
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
