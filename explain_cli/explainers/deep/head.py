"""The explained output (``targets.output``: probability, log-odds; a contrast) with exact rules.

The model's own calls get their rules from the tape; what ``targets`` puts on top of the outputs runs
after the model, against the references' recorded outputs, so its rules take the reference values
directly: the sigmoid by the rescale rule, the softmax as :func:`softmax_against`, and the
log-sum-exp of the other classes (softmax log-odds) decomposed the same way (row max, exp, sum, log).
The logit, and a difference of logits, are linear: plain gradients.
"""

from __future__ import annotations

import torch

from explain_cli.explainers.deep.functions import Rescale, RowMax
from explain_cli.explainers.deep.softmax import softmax_against
from explain_cli.targets import TargetSpec, others


def logsumexp_against(u: torch.Tensor, u_r: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp over ``dim`` (dropped) with exact multipliers against ``u_r``: each row shifted by its
    own maximum (:class:`RowMax`), exp and log by the rescale rule, the sum linear."""
    m = RowMax.apply(u, u_r, dim)
    v = u - m
    v_r = u_r - u_r.amax(dim, keepdim=True)
    s = Rescale.apply(v, v_r, torch.exp).sum(dim, keepdim=True)
    s_r = torch.exp(v_r).sum(dim, keepdim=True)
    return (m + Rescale.apply(s, s_r, torch.log)).squeeze(dim)


def explained_deep(spec: TargetSpec, out: torch.Tensor, out_r: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``spec.explained(out, classes)`` (rows, k) whose backward gives exact DeepLIFT multipliers against
    the references' outputs ``out_r`` (rows, C)."""
    sigmoid = spec.is_sigmoid(out.shape[1])
    out, out_r = spec.outputs(out), spec.outputs(out_r)  # a binary model's [-z, z]: linear, plain gradients

    def quantity(cls: torch.Tensor) -> torch.Tensor:
        z, z_r = out.gather(1, cls), out_r.gather(1, cls)
        if spec.output == "logit":
            return z
        if spec.output == "probability":
            if sigmoid:
                return Rescale.apply(z, z_r, torch.sigmoid)
            return softmax_against(out, out_r, 1).gather(1, cls)
        if sigmoid:  # the log-odds of a sigmoid are the logit
            return z
        return z - logsumexp_against(others(out, cls), others(out_r, cls), 2)

    value = quantity(classes)
    if spec.contrast is not None:
        value = value - quantity(classes.new_full((classes.shape[0], 1), spec.contrast))
    return value
