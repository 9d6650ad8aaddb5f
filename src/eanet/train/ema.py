"""An exponential moving average of the weights, updated after every optimizer step.

ema = d * ema + (1 - d) * w for every floating-point tensor of the state dict (buffers such
as the normalisation statistics are copied), with the decay warmed up as TensorFlow's
ExponentialMovingAverage(num_updates=...) does: d_t = min(decay, (1 + t) / (10 + t)), so a
short run on a small data set does not average in its random initialisation for thousands
of steps. The update count is saved with the averages, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from eanet.checkpoint import EMA_PREFIX as PREFIX


class EMA:
    """Shadow copies of a model's state dict, averaged with `update(model)`."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        """The decay of the next update (warmed up by the count of updates so far)."""
        t = self.updates + 1
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the averages."""
        d = self.current_decay()
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadow.mul_(d).add_(value.detach(), alpha=1.0 - d)
            else:
                shadow.copy_(value)
        self.updates += 1

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averages into `model` (same architecture) and return it."""
        model.load_state_dict(self.shadow)
        return model

    def tensors(self) -> dict[str, torch.Tensor]:
        """The averages and the update count, named for a checkpoint's extra tensors."""
        out = {PREFIX + k: v.detach().cpu() for k, v in self.shadow.items()}
        out["ema_updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from `tensors()` of a checkpoint; KeyError if they are not there."""
        for name, shadow in self.shadow.items():
            shadow.copy_(tensors[PREFIX + name])
        self.updates = int(tensors["ema_updates"])


def ema_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA model state dict held in a checkpoint's extra tensors (empty if none)."""
    return {k[len(PREFIX) :]: v for k, v in tensors.items() if k.startswith(PREFIX)}
