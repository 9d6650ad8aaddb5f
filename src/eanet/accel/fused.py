"""Faster equivalents of the reference's elementwise work: the functions the layers call.

On a CPU the EANet training step is dominated not by matmuls but by passes over
(B, N, 256) tensors: dropout masks drawn with `bernoulli_`, and the double normalisation
with its autograd backward. These functions compute the same values in fewer passes, each
on its own kernel, and live beside it in `eanet.accel.ops` (one module per kernel, with
its reasons); this module re-exports them:

- `masked`, `keep_mask` (ops/dropout.py): dropout masks without the 1/(1-p) rescale, 4
  decisions per 64-bit random word, on the CPU kernels/dropout.c;
- `double_normalize`, `double_normalize_into` (ops/double_normalize.py): softmax over the
  tokens and division by the sum over the memory slots, on the CPU in one cache-sized
  pass per batch element each way;
- `gelu_tanh` (ops/gelu.py): the reference's GELU with the MLP's dropout after it;
- `layer_norm`, `add_layer_norm` (ops/layer_norm.py): the blocks' LayerNorms (the second
  with the residual add before it) under CPU bf16 autocast;
- `softmax_last`, `softmax_last_into`, `softmax_dropout` (ops/softmax.py): self-attention's
  softmax in CPU bf16 inference, and with its dropout in CPU bf16 training.
"""

from __future__ import annotations

from eanet.accel.ops._common import with_bias
from eanet.accel.ops.double_normalize import double_normalize, double_normalize_into
from eanet.accel.ops.dropout import keep_mask, masked, random_halves
from eanet.accel.ops.gelu import gelu_tanh
from eanet.accel.ops.layer_norm import add_layer_norm, layer_norm
from eanet.accel.ops.softmax import softmax_dropout, softmax_last, softmax_last_into

__all__ = [
    "add_layer_norm",
    "double_normalize",
    "double_normalize_into",
    "gelu_tanh",
    "keep_mask",
    "layer_norm",
    "masked",
    "random_halves",
    "softmax_dropout",
    "softmax_last",
    "softmax_last_into",
    "with_bias",
]
