"""The private upstream interfaces the accel layer relies on, each in one place with its reason.

Nothing else in eanet touches a private name of torch or of the operating system but
`eanet.compat` (the training and data code's two, each with a public fallback;
tests/test_upstream.py scans the package for any other); if one of these changes
upstream, this file is the one to mend (the tests of `eanet.accel` fail on it first).
"""

from __future__ import annotations

import torch
from torch import nn


def softmax_backward(
    grad: torch.Tensor, out: torch.Tensor, dim: int, dtype: torch.dtype
) -> torch.Tensor:
    """out * (grad - sum(grad * out, dim)) by torch's own softmax backward kernel.

    Why: the double normalisation's hand-written backward needs the softmax backward of its
    saved output; the public route (autograd through `torch.softmax`) would keep a second
    graph and its tensors alive.
    """
    return torch._softmax_backward_data(grad, out, dim, dtype)


def mapped_libraries() -> set[str]:
    """The paths of the shared libraries mapped into this process (`/proc/self/maps`).

    Why: the kernels must link the OpenMP runtime torch itself runs on (a second runtime
    spins its own threads beside torch's), and neither torch nor Python names the one
    that is loaded. Empty where /proc is unreadable (the kernels then run unthreaded).
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            return {line.split()[-1] for line in f if ".so" in line}
    except OSError:
        return set()


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether `module` has forward (pre-)hooks of its own (`Module._forward_hooks`, ...).

    Why: `FusedBlocks` runs its blocks without calling them, which would skip a user's
    hooks on a block; torch has no public way to ask whether a module has any.
    """
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether `module` has hooks of its own: forward, forward pre, backward or backward pre.

    Why: the faster layers read some children's weights instead of calling them (a folded
    linear layer, a LayerNorm run by a kernel), which would skip a user's hooks on them;
    `accel.apply` leaves such a module plain. torch has no public way to ask.
    """
    return has_forward_hooks(module) or bool(module._backward_hooks or module._backward_pre_hooks)
