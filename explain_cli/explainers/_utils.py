"""Batching and hook helpers shared by the explainers (hooks are always removed in ``finally``)."""

from __future__ import annotations

import logging
import math
import weakref
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from explain_cli import input_shape
from explain_cli.input_shape import InputSize

log = logging.getLogger("explain_cli")

# Listeners told how many rows each model call of an explain() evaluated: the progress heartbeat
# (explain_cli.progress) counts model evaluations inside an image, so a long image is not silence.
_evaluation_listeners: list[Callable[[int], None]] = []


def count_evaluations(rows: int) -> None:
    """Report ``rows`` model evaluations just done (the explainers' chunk loops call this)."""
    for listener in _evaluation_listeners:
        listener(rows)


@contextmanager
def counting_evaluations(listener: Callable[[int], None]) -> Iterator[None]:
    """Call ``listener(rows)`` after every model call of the explainers while inside."""
    _evaluation_listeners.append(listener)
    try:
        yield
    finally:
        _evaluation_listeners.remove(listener)


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
    parts = []
    with torch.no_grad():
        for a, b in chunk_ranges(inputs.shape[0], size):
            parts.append(as_2d(model(inputs[a:b])))
            count_evaluations(b - a)
    return torch.cat(parts)


def two_rows(x: torch.Tensor) -> torch.Tensor:
    """A batch of one row as two copies of it (others unchanged), for passes that take gradients: in
    torch 2.14 the CPU batch-norm backward is wrong for a batch of one when the incoming gradient is
    strided (after ``flatten(2).transpose(1, 2)`` and a strided slice, as in LeViT and XCiT): gradients
    off by ~100% at ``batch_size: 1`` or in a last chunk of one row. The caller uses the first row."""
    return torch.cat([x, x]) if x.shape[0] == 1 else x


class LayerInput:
    """Holds the input of a target layer captured during a forward pass (a tensor, or whatever the
    layer was given, e.g. a list, for ``captured_feature_map`` to refuse)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | list | tuple | None = None


def captured_feature_map(captured: LayerInput, layer_name: str, explainer: str,
                         rows: int | None = None) -> torch.Tensor:
    """The captured layer input: a 4-D (N, C, H, W) map or a 3-D (N, tokens, C) token sequence, with
    ``rows`` rows when given (the batch the model ran on).

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
    if rows is not None:
        check_rows(target, rows, layer_name)
    return target


def check_rows(value: torch.Tensor, rows: int, layer_name: str, suggestions: list[str] | None = None) -> None:
    """ConfigError unless the layer input has one row per image: a layer that folds windows (Swin,
    MaxViT), unfolded patches (MobileViT) or inner tokens (TNT) into the batch holds each image in
    several rows, whose order the explainers cannot put back onto the image."""
    from explain_cli.errors import ConfigError

    if value.shape[0] != rows:
        raise ConfigError("model.layer", folded_batch_message(layer_name, tuple(value.shape), rows,
                                                              suggestions or []))


def folded_batch_message(layer_name: str, shape: tuple, rows: int, suggestions: list[str]) -> str:
    per = f"{shape[0] / rows:g}"
    hint = (f"choose a layer that takes one row per image, e.g. {', '.join(repr(s) for s in suggestions)}, "
            if suggestions else "choose the block or stage around it, ")
    sequence_first = " (or it is sequence-first: (tokens, N, C))" if len(shape) == 3 and shape[1] == rows else ""
    return (f"the input of layer '{layer_name}' has shape {shape} for {rows} image(s): it folds {per} windows, "
            "patches or inner tokens of each image into the batch (window attention, MobileViT's unfolded "
            f"patches, TNT's pixel tokens){sequence_first}, which gradient and deep cannot put back onto the "
            f"image; {hint}or 'input'")


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
    order: tuple[int, ...] | None = None  # the patch token of each grid cell (row-major), when not in order

    def to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., tokens, C) -> (..., C, h, w), prefix tokens dropped."""
        h, w = self.grid
        patches = tokens[..., self.prefix:, :]
        if self.order is not None:
            patches = patches[..., torch.tensor(self.order, device=tokens.device), :]
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


def _unrolled_order(model: torch.nn.Module, layer_name: str, tokens: int) -> TokenGrid | None:
    """Hiera (timm) keeps its tokens in "unrolled" order (mask units interleaved) until its last
    stage; its ``reroll`` module knows, per block, how to put them back. The input of ``blocks.K``
    is the output of ``blocks.K-1`` (of the unrolling for K = 0): reroll a token index through that
    block's schedule to get the token of each grid cell. None for other models; ConfigError for a
    Hiera layer that is not a block's input."""
    from explain_cli.errors import ConfigError

    for name, module in _ancestors(model, layer_name):
        reroll = getattr(module, "reroll", None)
        if not (isinstance(getattr(reroll, "schedule", None), dict) and hasattr(module, "unroll")):
            continue
        inner = layer_name[len(name) + 1:] if name else layer_name
        parts = inner.split(".")
        if len(parts) != 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ConfigError("model.layer", f"layer '{layer_name}' holds {type(module).__name__}'s tokens in its "
                                             "\"unrolled\" order (mask units interleaved), which only a block's "
                                             "input can be put back into grid order from: choose 'blocks.K', or "
                                             "'input'")
        block = max(int(parts[1]) - 1, 0)
        _, size = reroll.schedule[block]
        if len(size) != 2 or size[0] * size[1] != tokens:
            raise ConfigError("model.layer", f"layer '{layer_name}' takes {tokens} tokens but "
                                             f"{type(module).__name__}'s schedule expects a {size} grid there")
        index = torch.arange(tokens, dtype=torch.float64).view(1, tokens, 1)
        with torch.no_grad():
            order = reroll(index, block).reshape(-1).round().long().tolist()
        return TokenGrid(0, (int(size[0]), int(size[1])), f"{type(module).__name__} unrolled token order, put back "
                         f"by its reroll schedule of block {block}", order=tuple(order))
    return None


def _declared_tokens(model: torch.nn.Module, layer_name: str
                     ) -> tuple[tuple[int, str] | None, tuple[tuple[int, int], str] | None]:
    """The prefix-token count and the patch grid the nearest modules containing the layer declare,
    each with its evidence (None: not declared)."""
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
    return prefix, grid


def _square_grid(tokens: int, count: int, prefix: tuple[int, str] | None) -> TokenGrid | None:
    """The square grid the token count makes, after the declared prefix (or none at this layer)."""
    for candidate in ((count, 0) if count else (0,)):
        side = math.isqrt(max(tokens - candidate, 0))
        if side > 0 and side * side == tokens - candidate:
            why = prefix[1] if prefix is not None else "none declared by the model"
            if candidate != count:
                why = f"none at this layer ({tokens} tokens are a square; {why} counts tokens added later)"
            return TokenGrid(candidate, (side, side), f"prefix tokens: {why}; square grid from the token count",
                             assumed=True)
    return None


def token_grid(model: torch.nn.Module, layer_name: str, tokens: int) -> TokenGrid:
    """Map the ``tokens`` of the input of ``layer_name`` onto the patch grid, from what the model
    (or the nearest module containing the layer) declares; otherwise, if the token count minus the
    known prefix is a perfect square, that square (``assumed``). ConfigError when neither works.

    The prefix is counted per layer: XCiT and CaiT add their class token only in the late
    class-attention blocks, so an early block holds the patch tokens alone although the model
    declares one prefix token (the token count equals the grid there)."""
    from explain_cli.errors import ConfigError

    unrolled = _unrolled_order(model, layer_name, tokens)
    if unrolled is not None:
        return unrolled
    prefix, grid = _declared_tokens(model, layer_name)
    count = prefix[0] if prefix is not None else 0
    if grid is not None:
        cells = grid[0][0] * grid[0][1]
        if count + cells == tokens:
            return TokenGrid(count, grid[0], f"{prefix[1] if prefix else 'no prefix'}, {grid[1]}")
        if count and cells == tokens:
            return TokenGrid(0, grid[0], f"no prefix tokens at this layer ({tokens} tokens = the grid; "
                                         f"{prefix[1]} counts tokens added by later blocks), {grid[1]}")
    square = _square_grid(tokens, count, prefix)
    if square is not None:
        return square
    declared = (f"the model declares {count} prefix token(s) ({prefix[1]})" if prefix is not None
                else "the model declares no prefix-token count")
    if grid is not None:
        declared += f" and a {grid[0][0]}x{grid[0][1]} patch grid ({grid[1]})"
    raise ConfigError("model.layer", f"the input of layer '{layer_name}' is a sequence of {tokens} tokens that "
                                     f"cannot be mapped onto a patch grid: {declared}, and {tokens} - {count} "
                                     "is not a square number; choose a layer whose input is a "
                                     "(N, C, H, W) feature map or a ViT block, or 'input'")


@dataclass(frozen=True)
class MapLayout:
    """Where the channels and positions of a 4-D layer input sit: ``(C, H, W)`` (``channels_last``
    False), ``(H, W, C)`` (timm's Swin, MambaOut, Sequencer2d, VOLO and torchvision's swin_t stages)
    or, with ``blocks``, ``(blocks, tokens, C)``: square blocks of tokens, blocks and the tokens in a
    block each in row-major order (timm's NesT: ``blockify``)."""

    channels_last: bool
    found: str  # the evidence, for the log and run.json
    blocks: tuple[int, int] | None = None  # (rows, columns) of blocks on the grid
    block: tuple[int, int] | None = None  # (rows, columns) of tokens in a block

    def to_map(self, values: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W), (..., H, W, C) or (..., blocks, tokens, C) -> (..., C, H, W)."""
        if self.blocks is not None and self.block is not None:
            (gh, gw), (bh, bw) = self.blocks, self.block
            lead = values.shape[:-3]
            cells = values.reshape(*lead, gh, gw, bh, bw, values.shape[-1]).transpose(-4, -3)
            return cells.reshape(*lead, gh * bh, gw * bw, values.shape[-1]).movedim(-1, -3)
        return values.movedim(-1, -3) if self.channels_last else values

    def describe(self) -> dict:
        """The run.json entry ``layer_layout``."""
        if self.blocks is not None:
            return {"layout": "(blocks, tokens, C)", "blocks": list(self.blocks), "block": list(self.block or ()),
                    "from": self.found}
        return {"layout": "(H, W, C)" if self.channels_last else "(C, H, W)", "from": self.found}


def map_layout(shape: tuple[int, ...], probe: tuple[int, ...] | None, layer_name: str) -> MapLayout:
    """The channel dimension of a 4-D layer input ``shape`` (batch first, from a square image),
    from evidence, not the rank alone: ``probe`` is its shape for an image of another size (None
    when the model refuses other sizes), whose changed dimensions are the spatial ones; without it,
    the two spatial dimensions are the equal pair (a square image gives a square map). ConfigError
    when neither tells the layouts apart (e.g. (N, 8, 8, 8) from a model of one fixed input size)."""
    from explain_cli.errors import ConfigError

    _, a, b, c = shape
    changed = _size_changed(shape, probe)
    if changed == [2, 3]:
        return MapLayout(False, f"dimensions 2, 3 follow the input size (probe: {tuple(probe or ())})")
    if changed == [1, 2]:
        return MapLayout(True, f"dimensions 1, 2 follow the input size (probe: {tuple(probe or ())})")
    first, last = b == c, a == b
    if first and not last:
        return MapLayout(False, "dimensions 2, 3 are the equal (square) pair")
    if last and not first:
        return MapLayout(True, "dimensions 1, 2 are the equal (square) pair")
    why = "all three are equal" if first else "no two spatial dimensions are equal"
    raise ConfigError("model.layer", f"the input of layer '{layer_name}' has shape {tuple(shape)}: (N, C, H, W) or "
                                     f"(N, H, W, C) cannot be told apart ({why}, and the model does not run at "
                                     "another input size to show which dimensions are spatial); choose another "
                                     "layer, or 'input'")


def _size_changed(shape: tuple[int, ...], probe: tuple[int, ...] | None) -> list[int] | None:
    """The dimensions of a 4-D layer input that change with the input size (None: no probe)."""
    if probe is None or len(probe) != 4:
        return None
    return [d for d in (1, 2, 3) if probe[d] != shape[d]]


def blocked_reading(shape: tuple[int, ...]) -> MapLayout | None:
    """The ``(blocks, tokens, C)`` reading of a 4-D input ``(N, T, S, C)``: T square blocks of S
    tokens each, on a square grid of blocks (None when T or S is not a square, or the grid would
    be a single cell)."""
    _, t, s, _ = shape
    g, b = math.isqrt(t), math.isqrt(s)
    if g * g != t or b * b != s or g * b < 2:
        return None
    return MapLayout(True, f"{t} block{'s' if t != 1 else ''} of {s} tokens, blocks and tokens row-major",
                     blocks=(g, g), block=(b, b))


# A layout is confirmed by the quadrant probe when this share of the change lands in the changed
# quadrant (uniform: 1/4), and chosen over another reading only this far ahead of it.
CONFIRMED_SHARE = 0.9
SHARE_MARGIN = 0.2


def quadrant_share(changes: torch.Tensor, layout: MapLayout) -> float:
    """How much of the change of the layer input lands, read with ``layout``, in the quadrant of the
    image that changed: ``changes`` is ``|h(x_q) - h(x)|`` (4, *input shape) for the four quadrants
    q (top-left, top-right, bottom-left, bottom-right); the mean share over them."""
    mass = layout.to_map(changes.double()).sum(1)  # (4, H, W)
    h, w = mass.shape[-2:]
    if h < 2 or w < 2:
        return float("nan")
    shares = []
    top, bottom = slice(0, h // 2), slice(h - h // 2, h)
    left, right = slice(0, w // 2), slice(w - w // 2, w)
    for q, (rows, cols) in enumerate([(top, left), (top, right), (bottom, left), (bottom, right)]):
        total = float(mass[q].sum())
        shares.append(float(mass[q, rows, cols].sum()) / total if total > 0 else 0.0)
    return sum(shares) / len(shares)


def quadrant_changes(model: torch.nn.Module, layers: dict[str, torch.nn.Module],
                     size: InputSize) -> dict[str, torch.Tensor]:
    """``|h(x_q) - h(x)|`` (4, *input shape) of each named layer's first input, for one random image
    x of ``size`` (px, or (C, H, W)) and the four images x_q that differ from it in one quadrant (one forward of 5
    images; a layer whose input has another batch, or a model that fails, gives no entry)."""
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor) and args[0].shape[0] == 5:
                seen[name] = args[0].detach().float()
        return hook

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    g = torch.Generator().manual_seed(0)
    channels, height, width = input_shape.chw(size)
    base = torch.randn(1, channels, height, width, generator=g)
    images = base.repeat(5, 1, 1, 1)
    # the change: the middle of the quadrant, away from its edges
    half_h, side_h, half_w, side_w = height // 2, max(1, height // 4), width // 2, max(1, width // 4)
    for q, (r, c) in enumerate([(0, 0), (0, width - half_w), (height - half_h, 0), (height - half_h, width - half_w)]):
        r, c = r + (half_h - side_h) // 2, c + (half_w - side_w) // 2
        images[q + 1, :, r:r + side_h, c:c + side_w] += 2 * torch.randn(channels, side_h, side_w, generator=g)
    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            model(images.to(device=device, dtype=dtype))
    except Exception:  # noqa: BLE001 - a model that fails here gives no evidence
        return {}
    finally:
        for handle in handles:
            handle.remove()
    return {name: (value[1:] - value[:1]).abs() for name, value in seen.items()}


def needs_quadrant_probe(shape: tuple[int, ...], probe: tuple[int, ...] | None) -> bool:
    """True when a 4-D input could hold blocks of tokens and the size probe did not show its two
    spatial dimensions (a blocked layout keeps its tokens per block when the image grows)."""
    return blocked_reading(shape) is not None and _size_changed(shape, probe) not in ([1, 2], [2, 3])


def decide_layout(shape: tuple[int, ...], probe: tuple[int, ...] | None, changes: torch.Tensor | None,
                  layer_name: str, warn: bool = True) -> MapLayout:
    """:func:`map_layout`, and where the input could also be blocks of tokens (NesT), the reading
    the quadrant probe (``changes``, :func:`quadrant_changes`) confirms: the blocked one when it puts
    >= ``CONFIRMED_SHARE`` of each change in its quadrant and clearly more than the other reading.
    ConfigError when the probe confirms neither; without a probe, the shape's reading (``warn``:
    saying so)."""
    from explain_cli.errors import ConfigError

    try:
        layout, refused = map_layout(shape, probe, layer_name), None
    except ConfigError as exc:
        layout, refused = None, exc
    blocked = blocked_reading(shape)
    if blocked is None or not needs_quadrant_probe(shape, probe):
        if layout is None:
            raise refused  # type: ignore[misc]
        return layout
    if changes is None or not float(changes.sum()) > 0:
        if layout is None:
            raise refused  # type: ignore[misc]
        if warn:
            log.warning("layer '%s': its input %s could also be %d blocks of %d tokens, but the quadrant probe did not "
                        "run (the model failed on 5 images, or the input does not change with the image); read as "
                        "%s from its shape", layer_name, tuple(shape), shape[1], shape[2],
                        "(H, W, C)" if layout.channels_last else "(C, H, W)")
        return layout
    blocked_share = quadrant_share(changes, blocked)
    other = quadrant_share(changes, layout) if layout is not None else float("nan")
    if blocked_share >= CONFIRMED_SHARE and not other >= blocked_share - SHARE_MARGIN:
        return MapLayout(True, f"{blocked.found}: a probe that changes one quadrant of the image finds "
                               f"{blocked_share:.2f} of the change there", blocks=blocked.blocks, block=blocked.block)
    if layout is not None and other >= blocked_share + SHARE_MARGIN:
        return MapLayout(layout.channels_last, f"{layout.found}; a probe that changes one quadrant of the image "
                                               f"finds {other:.2f} of the change there")
    reading = ("(H, W, C)" if layout.channels_last else "(C, H, W)") if layout is not None else "a map"
    shares = f"{blocked_share:.2f} read as blocks" + (f", {other:.2f} read as {reading}" if layout is not None else "")
    raise ConfigError("model.layer", f"the input of layer '{layer_name}' has shape {tuple(shape)}: {reading} or "
                                     f"{shape[1]} block(s) of {shape[2]} tokens (as NesT stores them)? A probe "
                                     "that changes one quadrant of the image confirms neither (share of the "
                                     f"change in that quadrant: {shares}; {CONFIRMED_SHARE} confirms); choose "
                                     "another layer, or 'input'")


_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def layer_layout(model: torch.nn.Module, layer: torch.nn.Module, layer_name: str, shape: tuple[int, ...],
                 size: InputSize) -> MapLayout:
    """:func:`decide_layout` of ``layer``'s 4-D input ``shape`` (seen at ``size`` px), probing the
    model once at twice that size and, where the input could be blocks of tokens, once with one
    quadrant of the image changed; cached per layer module, shape and size (validate and every
    explainer ask the same question)."""
    key = (tuple(shape[1:]), input_shape.chw(size))
    cache = _LAYOUTS.setdefault(layer, {})
    if key not in cache:
        probe = _probe_shape(model, layer, input_shape.scaled(size, 2))
        changes = None
        if needs_quadrant_probe(tuple(shape), probe):
            changes = quadrant_changes(model, {layer_name: layer}, size).get(layer_name)
            if changes is not None and tuple(changes.shape[1:]) != tuple(shape[1:]):
                changes = None
        cache[key] = decide_layout(tuple(shape), probe, changes, layer_name)
    return cache[key]


def _probe_shape(model: torch.nn.Module, layer: torch.nn.Module, size: InputSize) -> tuple[int, ...] | None:
    """The shape of ``layer``'s first input for one zero image of ``size`` px (None: the model fails)."""
    seen: list[tuple[int, ...]] = []

    def hook(module: torch.nn.Module, args: tuple) -> None:
        if not seen and args and isinstance(args[0], torch.Tensor):
            seen.append(tuple(args[0].shape))

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_shape.zeros(size, device=device, dtype=dtype))
    except Exception:  # noqa: BLE001 - a model of one fixed input size: no evidence from this probe
        return None
    finally:
        handle.remove()
    return seen[0] if seen else None


def layer_map(values: torch.Tensor, model: torch.nn.Module, layer_name: str,
              layer: torch.nn.Module | None = None, size: InputSize | None = None) -> torch.Tensor:
    """Per-image attributions (N, k, *layer input shape) as (N, k, C, h, w): a token layer's
    (N, k, tokens, C) goes onto the patch grid, its prefix tokens dropped; a feature map is put in
    (C, H, W) order by :func:`layer_layout` (given ``layer`` and the input ``size``); the input's
    (N, k, C, H, W) is returned as it is."""
    if values.dim() == 4:
        return token_grid(model, layer_name, values.shape[2]).to_map(values).contiguous()
    if layer is None or size is None:
        return values
    layout = layer_layout(model, layer, layer_name, (1,) + tuple(values.shape[2:]), size)
    return layout.to_map(values).contiguous()


CANCELLING = 1e-3  # channel sums below this fraction of the values: the map cancels (rounding is ~1e-6)


def warn_if_cancelling(values: torch.Tensor, layer_name: str, explainer: str, warned: set[str]) -> None:
    """Warn once per layer when every map of a (N, k, C, H, W) batch cancels across its channels: the
    overlay (the channel sum) would be blank although the per-channel values are not zero."""
    if layer_name == "input" or layer_name in warned:
        return
    ratio = cancelling_channels(values)
    if ratio < CANCELLING:
        warned.add(layer_name)
        log.warning("%s at layer '%s': the map cancels across channels (channel sums are %.1e of the values), "
                    "so the overlay is blank. shap's layer attribution (%s) sums to zero over the channels of "
                    "an input that is normalised over its channels next (a LayerNorm at the start of the layer "
                    "is scale-invariant); explain a layer after that normalisation (e.g. a submodule of the "
                    "first block)%s", explainer, layer_name, ratio,
                    "gradient x layer input" if explainer == "gradient" else "multiplier x difference",
                    ", set explainer.path: layer (gradient x (h(x) - h(b)) does not cancel), or use the deep "
                    "explainer" if explainer == "gradient" else "")


def cancelling_channels(values: torch.Tensor) -> float:
    """How much of a (N, k, C, H, W) map survives the channel sum the overlay draws: the largest
    ``sum |sum_c v| / sum |v|`` over the maps (1: no cancellation; ~1e-6: rounding of an exact zero,
    as shap's gradient-times-input gives right after a normalisation over the channels)."""
    total = values.abs().sum(2).flatten(2).sum(2)
    summed = values.sum(2).abs().flatten(2).sum(2)
    ratio = summed / total.clamp_min(torch.finfo(values.dtype).tiny)
    ratio = torch.where(total > 0, ratio, torch.ones_like(ratio))
    return float(ratio.max()) if ratio.numel() else 1.0


@contextmanager
def layer_input_hook(layer: torch.nn.Module, rewrite: Callable[[object], object]) -> Iterator[LayerInput]:
    """For the duration, call ``rewrite(h)`` on the first positional input ``h`` of every forward of
    ``layer``: the result is recorded (``captured.value``) and, when it is not ``h`` itself, given to the
    layer instead (its other arguments unchanged). The hook is removed in ``finally``, whatever the body
    raised: the one forward pre-hook helper of the explainers."""
    captured = LayerInput()

    def hook(module: torch.nn.Module, args: tuple) -> tuple | None:
        first = args[0]
        captured.value = rewrite(first)
        return None if captured.value is first else (captured.value,) + tuple(args[1:])

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def capture_layer_input(layer: torch.nn.Module, make_leaf: bool = False) -> AbstractContextManager[LayerInput]:
    """Record the first positional input of ``layer`` on every forward.

    With ``make_leaf`` the input is replaced by a detached leaf that requires grad, so gradients can
    be taken with respect to it while the part of the network in front of the layer builds no graph.
    """
    def leaf(first: object) -> object:
        return first.detach().requires_grad_(True) if make_leaf and isinstance(first, torch.Tensor) else first

    return layer_input_hook(layer, leaf)


def replace_layer_input(layer: torch.nn.Module,
                        replace: Callable[[torch.Tensor], torch.Tensor]) -> AbstractContextManager[LayerInput]:
    """Replace the first positional input ``h`` of ``layer`` by ``replace(h)`` on every forward; the
    captured value is the replacement (or the input itself when it is not a tensor, for
    ``captured_feature_map`` to refuse). The rest of the model, skip connections that bypass the
    layer included, runs on what it was given."""
    return layer_input_hook(layer, lambda first: replace(first) if isinstance(first, torch.Tensor) else first)


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
