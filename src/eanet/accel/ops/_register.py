"""One helper that makes a Python function a `torch.library` custom op with its fake and its
autograd, so that a kernel's module states all three in one place."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def kernel_op(
    name: str,
    *,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    seeded: bool = False,
    mutates_args: Sequence[str] = (),
) -> Callable[[Callable], Callable]:
    """Decorator: the op `eanet::<name>` calling the function, `fake` its meta function (what
    torch.compile and export trace instead), `backward` and `setup_context` its autograd
    (torch.library's `register_autograd`; none for an op that is itself a backward or runs
    without gradients), `seeded` where it draws from torch's generator (so compiled graphs
    never merge two calls). The op is what the module calls, as `custom_op` returns it."""
    tags = (torch.Tag.nondeterministic_seeded,) if seeded else None

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"eanet::{name}", fn, mutates_args=mutates_args, tags=tags)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        return op

    return register
