"""AdamW with Keras's epsilon: the reference's optimizer rule exactly, on torch's kernels.

Keras 3's Adam (and AdamW, which adds decoupled decay before it) folds both bias
corrections into the step size and adds epsilon to the raw sqrt(v):

    keras:  w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

torch's AdamW adds epsilon to the bias-corrected sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t):

    torch:  w -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps')

Dividing Keras's numerator and denominator by sqrt(1 - b2^t) shows the two equal exactly when
eps' = eps / sqrt(1 - b2^t). `KerasAdamW` sets that per group before every step, so torch's
own implementations (the default one on the CPU, the fused kernel on CUDA) run Keras's rule.
With a constant eps instead, the early steps differ most (eps' is 3.2e-6 at step 1 for
eps 1e-7), which shows when a training trajectory is compared with Keras's
(tests/test_keras_training.py).
"""

from __future__ import annotations

import math

import torch

#: the rules an AdamW may follow; the config option `adam_eps_rule` picks one
EPS_RULES = ("keras", "torch")


class KerasAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose epsilon is placed as Keras places it (module docstring).

    Each group keeps Keras's epsilon as `keras_eps` and the number of steps it has taken as
    `keras_t`; both travel with `state_dict()`, so a resumed run continues the same rule. A
    state dict saved by a plain AdamW (no `keras_t`) takes its step count from the
    parameters' own state and its `eps` as Keras's epsilon.
    """

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            group["keras_eps"] = group["eps"]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            t = group.get("keras_t")
            if t is None:
                t = _steps_taken(self, group)
            group.setdefault("keras_eps", group["eps"])
            group["keras_t"] = t + 1
            group["eps"] = keras_eps_for_torch(group["keras_eps"], group["betas"][1], t + 1)
        return super().step(closure)


def keras_eps_for_torch(eps: float, beta2: float, t: int) -> float:
    """The epsilon that makes torch's update at step `t` (1-based) Keras's with `eps`."""
    return eps / math.sqrt(1.0 - beta2**t)


def _steps_taken(optimizer: torch.optim.Optimizer, group: dict) -> int:
    """Steps already taken by `group`, from its parameters' state (0 for a new optimizer)."""
    for p in group["params"]:
        step = optimizer.state.get(p, {}).get("step")
        if step is not None:
            return int(step)
    return 0
