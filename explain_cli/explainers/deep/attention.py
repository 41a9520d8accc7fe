"""Attention (``scaled_dot_product_attention``, ``multi_head_attention_forward``): two bilinear
products around the softmax rule, with torch's own masking and projection steps."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from explain_cli.explainers.deep.calls import PLAIN, apply_rule, bind_args, needs_grad, unsupported
from explain_cli.explainers.deep.products import MATMUL
from explain_cli.explainers.deep.softmax import softmax_core
from explain_cli.explainers.deep.tape import Tape


def _attention(tape: Tape, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool, scale: float | None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v``: two bilinear products around the softmax rule."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = apply_rule(tape, MATMUL, torch.matmul, (q * scale, k.transpose(-2, -1)))
    if causal:
        length, source = scores.shape[-2:]
        keep = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = softmax_core(tape, scores, -1, False)
    return apply_rule(tape, MATMUL, torch.matmul, (weights, v))


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_rule(tape: Tape, func, args, kwargs):
    """F.scaled_dot_product_attention (eval: dropout_p 0), masks, ``is_causal``, ``scale``, GQA."""
    p = bind_args(_SDPA_ARGS, {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                           "enable_gqa": False}, args, kwargs)
    q, k, v, mask = p["query"], p["key"], p["value"], p["attn_mask"]
    if not needs_grad((q, k, v, mask)):
        return PLAIN
    if p["dropout_p"] or (p["is_causal"] and mask is not None):
        return unsupported(tape, func)  # random (training), or an error torch raises itself
    if p["enable_gqa"] and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
    return _attention(tape, q, k, v, mask, bool(p["is_causal"]), p["scale"])


def mha_rule(tape: Tape, func, args, kwargs):
    """F.multi_head_attention_forward (what nn.MultiheadAttention calls), torch's own steps with the
    attention core of :func:`_attention`; returns ``(output, weights or None)`` as torch does."""
    p = inspect.signature(F.multi_head_attention_forward).bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if not needs_grad((query, key, value, a["static_k"], a["static_v"])):
        return PLAIN
    helpers = [getattr(F, n, None) for n in ("_mha_shape_check", "_canonical_mask", "_none_or_dtype",
                                             "_in_projection_packed", "_in_projection")]
    if a["is_causal"] and a["attn_mask"] is None:
        return PLAIN  # torch raises its own error
    if (a["dropout_p"] and a["training"]) or None in helpers:
        return unsupported(tape, func)  # random (training), or a torch without these helpers
    shape_check, canonical_mask, none_or_dtype, in_projection_packed, in_projection = helpers
    attn_mask, kpm = a["attn_mask"], a["key_padding_mask"]
    is_batched = shape_check(query, key, value, kpm, attn_mask, a["num_heads"])
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        kpm = kpm.unsqueeze(0) if kpm is not None else None
    kpm = canonical_mask(mask=kpm, mask_name="key_padding_mask", other_type=none_or_dtype(attn_mask),
                         other_name="attn_mask", target_type=query.dtype)
    causal = bool(a["is_causal"])
    if causal and kpm is None and not a["need_weights"]:
        attn_mask = None
    else:
        attn_mask = canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                   target_type=query.dtype, check_other=False)
        causal = False  # the given mask is used (torch's weights path ignores the hint too)
    if not a["use_separate_proj_weight"]:
        q, k, v = in_projection_packed(query, key, value, a["in_proj_weight"], a["in_proj_bias"])
    else:
        bias = a["in_proj_bias"]
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        q, k, v = in_projection(query, key, value, a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"],
                                b_q, b_k, b_v)
    q, k, v, attn_mask = _mha_heads(a, q, k, v, attn_mask, kpm, tuple(query.shape))
    out, weights = _mha_attend(tape, a, q, k, v, attn_mask, causal, tuple(query.shape))
    if not is_batched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if weights is not None else None
    return out, weights


def _mha_heads(a, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
               kpm: torch.Tensor | None, shape: tuple[int, int, int]):
    """torch's steps between the projections and the attention: bias_k/bias_v, the heads as batch
    rows (static_k/static_v as given), add_zero_attn, the key padding mask merged into the mask."""
    tgt_len, bsz, embed_dim = shape
    num_heads = a["num_heads"]
    head_dim = embed_dim // num_heads
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if a["bias_k"] is not None and a["bias_v"] is not None:
        k = torch.cat([k, a["bias_k"].repeat(1, bsz, 1)])
        v = torch.cat([v, a["bias_v"].repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = (k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if a["static_k"] is None
         else a["static_k"])
    v = (v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if a["static_v"] is None
         else a["static_v"])
    if a["add_zero_attn"]:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        kpm = F.pad(kpm, (0, 1)) if kpm is not None else None
    src_len = k.shape[1]
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    return q, k, v, attn_mask


def _mha_attend(tape: Tape, a, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                causal: bool, shape: tuple[int, int, int]):
    """The attention core (the bilinear products around the softmax rule), the output projection, and
    the attention weights torch returns (averaged over heads when asked; None unless need_weights)."""
    tgt_len, bsz, embed_dim = shape
    num_heads = a["num_heads"]
    src_len = k.shape[1]
    scale = float(embed_dim // num_heads) ** -0.5
    scores = apply_rule(tape, MATMUL, torch.matmul, (q * scale, k.transpose(-2, -1)))
    if causal:
        keep = torch.ones(tgt_len, src_len, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = softmax_core(tape, scores, -1, False)
    out = apply_rule(tape, MATMUL, torch.matmul, (weights, v))
    out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, a["out_proj_weight"], a["out_proj_bias"]).view(tgt_len, bsz, -1)
    avg = None
    if a["need_weights"]:
        avg = weights.view(bsz, num_heads, tgt_len, src_len)
        avg = avg.mean(dim=1) if a["average_attn_weights"] else avg
    return out, avg
