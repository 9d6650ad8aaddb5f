"""The accel layer's ops, one module per native kernel in `kernels/`.

Each module holds a kernel's Python side: the applies-check (where the kernel runs), the
`torch.library` custom ops over the C code (`eanet::<name>`, each registered with its fake
and its autograd by `_register.kernel_op`), the checks of the sizes the C code trusts, and
the public function that falls back to torch's ops elsewhere:

- `dropout` (kernels/dropout.c): `masked`, `keep_mask`, and the seeds and threshold the
  other kernels draw dropout.c's mask from;
- `double_normalize` (kernels/double_normalize.c): `double_normalize`,
  `double_normalize_into`;
- `gelu` (kernels/gelu.c): `gelu_tanh`;
- `layer_norm` (kernels/layer_norm.c): `layer_norm`, `add_layer_norm`;
- `softmax` (kernels/softmax.c): `softmax_last`, `softmax_last_into`, `softmax_dropout`.

`_common` is what they share (as kernels/common.h is for the C files). A new kernel is
kernels/<name>.c, ops/<name>.py and its tests; `eanet.accel.fused` re-exports the public
functions the layers call.
"""
