"""Learning-rate schedules as pure functions of the optimizer step (no state to save).

"cosine": linear warm-up from `warmup_lr` to `lr` over the first `warmup_fraction` of all
steps, then a half cosine from `lr` down to `min_lr` at the last step, set before every
step (timm's CosineLRScheduler with t_in_epochs=False, warmup_t and lr_min; CCT's recipe).
The number of steps is epochs x steps per epoch, so a shorter `--epochs` compresses the
whole schedule, warm-up included: warm-up is a fraction of the run, not a count of epochs.
Being a function of the step, the schedule resumes exactly: the step is (epoch - 1) x
steps per epoch + the step within the epoch. A resumed run given a new `--epochs` follows
the schedule of the new length from where it stands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate at each of `total_steps` optimizer steps."""

    kind: str
    lr: float
    total_steps: int
    warmup_fraction: float = 0.0
    warmup_lr: float = 0.0
    min_lr: float = 0.0

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_fraction * self.total_steps)

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if self.kind == "constant":
            return self.lr
        warm = self.warmup_steps
        if step < warm:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / warm
        decay_steps = max(self.total_steps - 1 - warm, 1)
        t = min((step - warm) / decay_steps, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * t))
