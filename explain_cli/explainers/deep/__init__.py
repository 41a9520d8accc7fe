"""DeepSHAP: the DeepLIFT rescale rule averaged over a background set, batched over images x references.

This computes the quantity of ``shap.DeepExplainer(model, background)`` (input target) or
``shap.DeepExplainer((model, layer), background)`` (layer target): for an image ``x``, an explained
class ``c`` and each background reference ``r_j`` (``j = 1..B``), DeepLIFT gives multipliers ``m_j``
with ``sum(m_j * (x - r_j)) = f_c(x) - f_c(r_j)``; the attribution is their mean::

    phi = mean_j  m_j * (x - r_j)        so  sum(phi) = f_c(x) - mean_j f_c(r_j)

At a layer, ``x - r_j`` is replaced by the difference of the layer's *input* (first positional
argument of its ``forward``) at the image and at the reference; the base value stays the mean model
output over the background. A token input ``(N, tokens, C)`` is attributed per token and channel and
put on the patch grid at the end (``_utils.layer_map``; the prefix tokens' share stays in ``shap_sum``;
NesT's blocks of tokens go back onto the grid block by block).

How the multipliers are obtained ("modified gradients"). The model runs unchanged; while it runs, a
``TorchFunctionMode`` intercepts every torch call, so module calls (``nn.ReLU``), functional calls
(``F.relu``, ``torch.sigmoid``, ``x.sigmoid()``) and in-place variants (``relu_``,
``nn.ReLU(inplace=True)``, ``x *= s``) are all seen, however often a module is reused. Every
nonlinear call gets a custom backward whose local multiplier reproduces the *difference* of its
output between image and reference exactly:

* elementwise functions ``y = g(u)`` (relu, relu6/hardtanh, leaky_relu, elu, gelu, silu, sigmoid,
  tanh, hardswish, hardsigmoid, mish, softplus, exp, log, sqrt, rsqrt, reciprocal, pow with a
  constant exponent, clamp, abs, ...): rescale rule ``m = (g(u_x) - g(u_r)) / (u_x - u_r)``; where
  ``|u_x - u_r| <= sqrt(eps_dtype) * (|u_x| + |u_r|)`` (the quotient would be rounding noise), the
  slope of ``g`` over a window of that width around the midpoint;
* products of two input-dependent tensors (squeeze-excitation ``x * sigmoid(s)``, ``x * x``):
  ``d(ab) = mean(a) * db + mean(b) * da`` with ``mean(a) = (a_x + a_r) / 2`` (exact, and the Shapley
  value of the two factors); the same rule for ``matmul``/``bmm``/``mm`` (any bilinear map);
* division by an input-dependent tensor: ``a / b = a * (1 / b)``, the reciprocal by the rescale rule;
* max pooling (``max_pool1d/2d/3d``, ``adaptive_max_pool1d/2d/3d``): shap's rule, per window: the
  output difference ``dy`` goes to the image's winner ``i`` when ``dy >= 0`` (multiplier
  ``dy / du[i]``, in [0, 1] since ``du[i] >= dy``) and to the reference's winner ``k`` when ``dy < 0``
  (``dy / du[k]``, ``du[k] <= dy``); summed over windows, so overlapping windows (the ResNet stem)
  stay exact where shap's unpooling drops all but one window;
* maxima over a dimension (``amax``/``amin``, ``max``/``min`` with ``dim``) and elementwise
  ``maximum``/``minimum`` (the max of a stacked pair): the same rule with the whole row as the window;
* decomposed into the rules above, so exact as well: softmax / log_softmax (each row shifted by its
  own maximum, so no factor over- or underflows), scaled_dot_product_attention and torch's
  multi_head_attention_forward (masks, causal, scale, key padding, bias_k/v, zero attention, separate
  projections; two bilinear products around the softmax), layer_norm, group_norm, instance_norm,
  rms_norm, ``F.normalize``, vector norms over given dims (``torch.norm``, ``linalg.vector_norm``:
  ConvNeXt-V2's GRN), ``baddbmm``/``addmm``/``addcmul`` of two input-dependent factors, and
  ``linear``/``conv`` with an input-dependent weight (CondConv's per-image kernels: bilinear);
* eval-mode batch norm: written out as a scale and shift (torch 2.14's CPU kernel has a wrong backward
  for a batch of one row with a strided incoming gradient);
* everything else that is linear (conv, linear, add, cat, views, average and adaptive-average
  pooling, eval-mode dropout, interpolate, repeat_interleave, ...) keeps its plain gradient, which is
  exact. Tensors that do not depend on the input (weights: BiT's weight standardisation computes a
  batch norm over its weights, rotary-embedding tables, attention biases) are constants.

Each rule is exact, so the attributions are additive up to floating-point rounding. An operation that
is neither linear nor covered (``torch.where``, ``sort``/``topk``, ``prod``, train-mode batch norm or
dropout, a product of three input-dependent einsum operands, ...) keeps its plain gradient and the
explainer logs a warning naming it once, whatever the call returns (a tensor, a tuple): the
``additivity_error`` column then shows the cost. Integer results that depend on the input (an argmax
used to index) are taken as the image's: such indexing is not covered by any rule and not reported.

The reference side is computed once per run: the background goes through the model once (in chunks
of ``batch_size``), recording the input of every nonlinear call, the layer input (layer target) and
the model outputs (base values). An explained chunk then holds ``batch_size`` (image, reference) rows;
each intercepted call looks up its recorded reference values by call order. The batch need not be the
first dimension of a call's tensors: the first reference goes through alone before the chunks, and
comparing shapes finds, per call, the dimension that holds the batch (Swin folds it into its windows,
``B * windows``; torch's multi-head attention runs sequence-first). This needs the model to make the
same sequence of nonlinear calls for every batch (true of feed-forward classifiers; otherwise the
explainer raises). Memory: the recorded inputs of the nonlinear calls of all
references stay on the device for the run (about the forward activations of ``B`` images; cap ``B``
with ``max_background``).

Attributions at a layer add up to ``f(x) - E f(r)`` when every path from the input to the output
runs through that layer's input (e.g. a stage of a sequential model); a layer inside a residual
block is bypassed by the skip connection, so the sum then misses the skip path's share.

The model must be an eager ``nn.Module``: TorchScript runs outside Python, where no call can be
intercepted (a TorchScript model is refused; scripted submodules are reported). While the explainer
runs, TF32 is switched off (cuDNN uses it for float32 convolutions by default on recent GPUs; it
would raise the float32 additivity error from ~1e-6 to ~1e-3 of the output differences). A model
that amplifies its own float32 rounding (EfficientViT's divisions by near-zero denominators) gets a
warning when its sums miss; ``float64: true`` runs a float64 copy of it (casts inside kept float64).

DeepSHAP is deterministic: the per-image ``seeds`` are not used. The sums over the first and the
second half of the background are kept apart, for ``stability`` (``explain_cli.stability``):
how much the map would change with another background of the same size.

Where things are (one rule family per module, as Zennit keeps its rules; one table, as Captum's
DeepLift keeps its nonlinearities):

* ``functions``: the autograd Functions every rule is built from (``Rescale``, ``Product``,
  ``MaxPool``, ``RowMax``, ``bilinear``, and the ``secant`` multiplier);
* ``tape``: the reference side, recorded once and looked up by call order (``Tape``, ``Slot``);
* ``calls``: what rules share (the ``PLAIN`` answer, the unsupported report, argument helpers);
* rule families: ``elementwise`` (rescale), ``products`` (mul, div, matmul, einsum, addmm, dynamic
  weights), ``softmax``, ``norms``, ``attention``, ``maxima`` (max pooling, max over a dim);
* ``dispatch``: which torch call gets which rule, which calls are linear, and the
  ``TorchFunctionMode`` that routes the model's calls;
* ``explainer``: ``Settings`` and ``Explainer`` (recording, chunking, gradients, the map).
"""

from explain_cli.explainers.deep.explainer import Explainer, Settings

__all__ = ["Explainer", "Settings"]
