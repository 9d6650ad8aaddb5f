"""The private torch names eanet uses outside `eanet.accel`, each behind a function.

Each function says why the private name (what the public route costs) and falls back to
the public route where torch no longer has it. With `accel/upstream.py` (the speed layer's
own) this is every private upstream name of the package: tests/test_upstream.py fails on
any `torch._...` name used elsewhere. Layer 0: training and data code import it.
"""

from __future__ import annotations

import torch


def _private(name: str):
    """torch's private function `name`, or None where this torch has none of that name."""
    return getattr(torch, name, None)


def max_abs_each(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """max |x| of each tensor (its infinity norm), a 0-dim tensor each, NaN where it holds one.

    Why `torch._foreach_norm`: on a GPU it computes the norms of a whole list of tensors
    (a model's gradients) in a few fused kernels, where the public `vector_norm` launches
    one per tensor, every training step. Fallback: `torch.linalg.vector_norm` per tensor.
    """
    foreach_norm = _private("_foreach_norm")
    if foreach_norm is not None:
        return list(foreach_norm(tensors, ord=float("inf")))
    return [torch.linalg.vector_norm(t, ord=float("inf")) for t in tensors]


def standard_gamma(concentration: torch.Tensor) -> torch.Tensor:
    """A Gamma(concentration, 1) sample of each element, drawn on its device.

    Why `torch._standard_gamma`: it is what `torch.distributions.Gamma(a, 1).sample()` draws
    (the same numbers from the same seed), without building a distribution per batch whose
    argument checks read the parameters back to the host (a sync on a GPU). Fallback: that
    distribution without its checks.
    """
    gamma = _private("_standard_gamma")
    if gamma is not None:
        return gamma(concentration)
    rate = torch.ones_like(concentration)
    return torch.distributions.Gamma(concentration, rate, validate_args=False).sample()
