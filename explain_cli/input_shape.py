"""The model input's shape for dummy and probe forwards.

Functions that probe the model take ``size``: an int (a square RGB image: what older callers and
the tests pass) or the config's ``preprocess.input_shape``, (C, H, W) (1 or N channels, non-square).
"""

from __future__ import annotations

from typing import Any, Union

InputSize = Union[int, tuple[int, ...]]


def chw(size: InputSize) -> tuple[int, int, int]:
    """(channels, height, width) of ``size``: an int is a square RGB image, (H, W) an RGB one."""
    if isinstance(size, int):
        return (3, size, size)
    dims = tuple(int(v) for v in size)
    if len(dims) == 2:
        return (3,) + dims  # type: ignore[return-value]
    if len(dims) != 3:
        raise ValueError(f"an input size is an int, (H, W) or (C, H, W); got {size!r}")
    return dims  # type: ignore[return-value]


def zeros(size: InputSize, **kwargs: Any):
    """One all-zero model input (1, C, H, W)."""
    import torch

    return torch.zeros((1,) + chw(size), **kwargs)


def scaled(size: InputSize, factor: int) -> tuple[int, int, int]:
    """``size`` with both spatial sides times ``factor`` (the layout probe's second image)."""
    c, h, w = chw(size)
    return (c, h * factor, w * factor)


def text(size: InputSize) -> str:
    """'(1, C, H, W)' of one image of ``size``, for messages."""
    c, h, w = chw(size)
    return f"(1, {c}, {h}, {w})"
