"""Training that survives interruption and divergence: signals and the step guard.

- **Interruption.** While `fit` runs an epoch, the first Ctrl-C (SIGINT) or SIGTERM only
  asks training to stop: the current step finishes, the partial epoch is dropped, and the
  checkpoint of the last complete epoch, which is what `--resume` continues from
  bit-exactly, is left as it is; `TrainingInterrupted` (a KeyboardInterrupt) then says how
  to resume. A signal that arrives while an epoch is being validated or saved lets that
  epoch finish and be saved first. A second signal stops at once (files are written
  atomically, so even that leaves nothing half-written). Under torchrun the signals keep
  their default behaviour: ranks stopping at different steps would wait on each other.
- **Divergence.** `StepGuard` watches the training loss: with `--on-nonfinite stop` (the
  default) a NaN or infinite loss stops training with the epoch and step, without a host
  sync per step (the flag stays on the device and is read every `CHECK_EVERY` steps and at
  the end of the epoch; under torchrun the ranks agree on it, so all of them stop); nothing
  of that epoch is saved. With `--on-nonfinite skip` a batch whose loss or gradient is not
  finite gets no optimizer step and is counted (one host sync per step; under torchrun the
  gradients are already averaged, so every rank skips the same batches).
"""

from __future__ import annotations

import functools
import logging
import shlex
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from eanet.choices import ON_NONFINITE
from eanet.compat import max_abs_each
from eanet.errors import EANetError
from eanet.train.distributed import launched_by_torchrun

log = logging.getLogger(__name__)


F = TypeVar("F", bound=Callable[..., Any])


CHECK_EVERY = 32  # steps between reads of the device-side non-finite flag (stop mode)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C or SIGTERM at a step boundary; the message says how to resume."""


class NonFiniteLoss(EANetError):
    """The training loss became NaN or infinite (with --on-nonfinite stop)."""


class BatchSkipped(Exception):
    """`train_step` skipped a batch whose loss or gradient is not finite (--on-nonfinite skip)."""


class _StopState:
    """What the signal handler shares with the training loop (one `fit` at a time)."""

    armed = False  # inside an epoch: a first signal only asks to stop
    requested: int | None = None  # the signal number received while armed


_stop = _StopState()


def _on_signal(signum: int, frame: Any) -> None:
    if _stop.armed and _stop.requested is None:
        _stop.requested = signum
        log.warning(
            "%s received: stopping after this step; the last complete epoch stays saved "
            "(press Ctrl-C again to stop at once)",
            signal.Signals(signum).name,
        )
        return
    raise KeyboardInterrupt


def graceful_interrupts(fn: F) -> F:
    """Decorate `fit`: while it runs, SIGINT/SIGTERM stop training at a step boundary."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is not threading.main_thread() or launched_by_torchrun():
            return fn(*args, **kwargs)
        previous = {s: signal.getsignal(s) for s in _SIGNALS}
        _stop.armed, _stop.requested = False, None
        for s in _SIGNALS:
            signal.signal(s, _on_signal)
        try:
            return fn(*args, **kwargs)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            _stop.armed, _stop.requested = False, None

    return wrapper  # type: ignore[return-value]


def _all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One boolean tensor: every value of every tensor is finite (no host sync)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.tensor(True)
    # max |x| per tensor (fused on GPUs): NaN or inf iff the tensor holds one; no overflow
    norms = max_abs_each(tensors)
    return torch.isfinite(torch.stack([n.float() for n in norms]).max())


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class StepGuard:
    """Interruption and non-finite-loss checks around the steps of `train_epoch`."""

    def __init__(
        self, on_nonfinite: str = "stop", lr: float | None = None, out: Path | None = None
    ):
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite {on_nonfinite!r} not in {ON_NONFINITE}")
        self.on_nonfinite = on_nonfinite
        self.lr = lr
        self.out = out
        self.skipped = 0  # batches skipped in the current epoch
        self._where = "training"
        self._steps = 0
        self._step = 0
        self._bad_step: torch.Tensor | None = None  # first step with a non-finite loss, or -1
        self._bad_loss: torch.Tensor | None = None

    # -- epoch boundaries

    def start_epoch(self, where: str, steps: int) -> None:
        """A new epoch, `where` naming it (e.g. "epoch 3/50"): reset the counters, arm signals."""
        self._where, self._steps, self._step, self.skipped = where, steps, 0, 0
        self._bad_step = self._bad_loss = None
        _stop.armed = True

    def end_epoch(self, model: torch.nn.Module) -> None:
        """Raise NonFiniteLoss if a loss of this epoch, or any weight, is not finite."""
        self._raise_if_diverged()
        if self.on_nonfinite == "skip" and self._steps and self.skipped == self._steps:
            raise NonFiniteLoss(self._diverged(f"all {self._steps} batches were skipped"))
        if not bool(_all_finite([p.detach() for p in model.parameters()])):
            raise NonFiniteLoss(self._diverged("the weights are no longer finite"))

    def epoch_saved(self) -> None:
        """After the epoch's checkpoint and history are written: stop now if a signal came."""
        if _stop.requested is not None:
            raise TrainingInterrupted(
                f"interrupted; resume with eanet train --resume {self._run()} "
                f"(stopped after {self._where}, which is saved)"
            )
        _stop.armed = False

    # -- steps

    def before_step(self, step: int) -> None:
        """Between steps: stop on a signal; every CHECK_EVERY steps read the non-finite flag."""
        self._step = step
        if _stop.requested is not None:
            raise TrainingInterrupted(self._interrupted_message())
        if step and step % CHECK_EVERY == 0:
            self._raise_if_diverged()

    def allow_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Called between backward and the optimizer step: False means skip this batch."""
        loss = loss.detach()
        if self.on_nonfinite == "skip":
            if bool(torch.isfinite(loss) & _all_finite(_grads(optimizer)).to(loss.device)):
                return True
            self.skipped += 1
            log.warning(
                "%s, step %d/%d: loss %s is not finite; batch skipped (no optimizer step)",
                self._where,
                self._step + 1,
                self._steps,
                float(loss),
            )
            return False
        # stop: remember the first non-finite loss on the device, no host sync here
        if self._bad_step is None:
            self._bad_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step < 0)
        self._bad_step = torch.where(first, self._step, self._bad_step)
        self._bad_loss = torch.where(first, loss.float(), self._bad_loss)
        return True

    # -- messages

    def _run(self) -> str:
        return shlex.quote(str(self.out)) if self.out is not None else "RUN_DIR"

    def _has_checkpoint(self) -> bool:
        from eanet.checkpoint import CHECKPOINT_NAME

        return self.out is None or (self.out / CHECKPOINT_NAME).is_file()

    def _interrupted_message(self) -> str:
        if not self._has_checkpoint():
            return (
                f"interrupted in {self._where} before any epoch was complete: nothing to "
                f"resume; start again (with --overwrite to reuse {self._run()})"
            )
        return (
            f"interrupted; resume with eanet train --resume {self._run()} (the partial "
            f"{self._where} is discarded; the run keeps its last complete epoch)"
        )

    def _raise_if_diverged(self) -> None:
        if self._bad_step is None:  # no step yet (stop mode only records)
            return
        bad = (self._bad_step >= 0).to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # all stop
        if not bool(bad):
            return
        step, value = int(self._bad_step), float(self._bad_loss)
        if step < 0:
            raise NonFiniteLoss(self._diverged("another process's training loss is not finite"))
        raise NonFiniteLoss(
            self._diverged(f"step {step + 1}/{self._steps}: the training loss is {value}")
        )

    def _diverged(self, what: str) -> str:
        kept = (
            "the run keeps the checkpoint of its last complete epoch"
            if self._has_checkpoint()
            else "no epoch was complete, nothing is saved"
        )
        lr = f" (this run: {self.lr:g})" if self.lr is not None else ""
        return (
            f"{self._where}, {what}: training diverged and stopped; {kept}. Start again "
            f"with a lower --lr{lr}, or pass --on-nonfinite skip to skip such batches"
        )
