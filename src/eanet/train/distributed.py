"""Multi-process training under torchrun: one process per device, DistributedDataParallel.

`torchrun --nproc_per_node N -m eanet train ...` starts N copies of the command with
RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT set; `setup` joins them into a process
group (gloo on the CPU, nccl on GPUs, GPU = cuda:LOCAL_RANK). Without those variables
nothing here does anything: the single-process path has no process group and no wrapper.

What stays exactly as in one process:
- `--batch-size` is the GLOBAL batch. Every rank draws the same permutation of the
  training set each epoch (from the shared global RNG stream, which only the permutation
  consumes in distributed mode) and takes its contiguous share of each global batch, so
  the ranks' shares of a step are, together, the single-process batch.
- DDP averages the ranks' gradients; with equal shares that is the gradient of the
  global batch's mean loss. The last, short batch is split as evenly as it goes (a rank
  may get one image less, or none) and each rank's mean loss is weighted by
  share * world_size / batch, which keeps the average equal to the global mean.
- Epoch metrics are all-reduced sums (loss * n, top-1 hits, top-5 hits, n): every rank
  logs the global figures. Validation and test sets are split across the ranks likewise.

What differs: augmentation and dropout draw from a per-rank stream, seeded from
(seed, epoch, rank) after the shared permutation is drawn; so with augmentation or
dropout on, a distributed run is a different (equally valid) random run than a single
process's. The shared stream is what checkpoints save, so resuming is exact too.

Only rank 0 touches the run directory and shows progress bars; it saves the unwrapped
model, so checkpoints are the same format as single-process ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from eanet.errors import ConfigError, EANetError
from eanet.metrics import Metrics
from eanet.runtime import resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    """True when the environment names this process's place in a group (torchrun sets it)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class _DDP(DistributedDataParallel):
    """DDP that lends its module's attributes (`normalize`, `config`) to the training code."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not set yet, inside DDP's own constructor
                raise
            return getattr(self.module, name)


@dataclass
class Distributed:
    """This process's place in the training group; world_size 1 and inert when not launched."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    enabled: bool = False  # a process group is in use
    owned: bool = False  # `setup` created the group, so `close` destroys it
    _perm_rng: torch.Generator | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    def describe(self) -> dict:
        """What to record next to a run."""
        backend = dist.get_backend() if self.enabled else None
        return {"world_size": self.world_size, "backend": backend}

    # ----------------------------------------------------------------------- setup

    def check_batch(self, batch_size: int) -> None:
        """The global batch must split evenly: each rank takes batch_size / world_size."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"--batch-size {batch_size} is the global batch and must divide evenly "
                f"among the {self.world_size} processes ({batch_size / self.world_size:g} "
                f"each); use a multiple of {self.world_size}"
            )

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` (which keeps the weights), or `model` alone."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # The buffers (normalisation statistics) are equal on every rank and never change
        # in training: no need to broadcast them before every forward.
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = (
            "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        )
        return _DDP(model, device_ids=ids, **{no_sync: False})

    def close(self) -> None:
        """Destroy the process group if `setup` created it. Release the model from `wrap`
        first: a DDP wrapper freed after the group is destroyed can deadlock (see `fit`)."""
        if self.owned and dist.is_initialized():
            # No rank tears its connections down while another still talks to it: a rank
            # that left early once aborted at exit ("terminate called without an active
            # exception") while rank 0 was still writing the run's last files.
            dist.barrier()
            dist.destroy_process_group()
        self.owned = False

    # ----------------------------------------------------------------------- randomness

    @contextlib.contextmanager
    def epoch_rng(self, seed: int, epoch: int) -> Iterator[None]:
        """Shared stream for the epoch's permutation, a per-rank stream for everything else.

        On entry the shared (global CPU) state is set aside for `permutation`; the global
        RNGs are reseeded from (seed, epoch, rank) for augmentation and dropout. On exit the
        shared state, advanced by the permutation only, is put back: it is what checkpoints
        save, and it is the same on every rank.
        """
        if not self.enabled:
            yield
            return
        shared = torch.Generator()
        shared.set_state(torch.get_rng_state())
        self._perm_rng = shared
        rank_seed = _derive_seed(seed, epoch, self.rank)
        torch.default_generator.manual_seed(rank_seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(rank_seed)  # the current device, cuda:LOCAL_RANK
        try:
            yield
        finally:
            torch.set_rng_state(shared.get_state())
            self._perm_rng = None

    def permutation(self, n: int, device: torch.device) -> torch.Tensor:
        """The epoch's order of the n training images, the same on every rank."""
        if self._perm_rng is None:
            raise RuntimeError("permutation() is only valid inside epoch_rng()")
        # Drawn on the CPU whatever the device: one stream that every rank holds alike.
        return torch.randperm(n, generator=self._perm_rng).to(device)

    # ----------------------------------------------------------------------- data

    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's contiguous share of a global batch, and the weight on its mean loss.

        A full batch splits into equal shares, weight 1. A short last batch splits as evenly
        as it goes, weight share * world_size / batch, so DDP's average of the ranks'
        gradients is the gradient of the batch's mean loss. A rank left without an image
        gets the batch's first one at weight 0: it must still join the gradient average.
        """
        part = idx.tensor_split(self.world_size)[self.rank]
        if len(part) * self.world_size == len(idx):
            return part, 1.0
        if len(part) == 0:
            return idx[:1], 0.0
        return part, len(part) * self.world_size / len(idx)

    def eval_shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous part of an evaluation set (all of it in one process)."""
        if not self.enabled:
            return tensors
        return tuple(t.tensor_split(self.world_size)[self.rank] for t in tensors)

    def all_reduce(self, m: Metrics) -> Metrics:
        """The metrics over every rank's images: sums of loss * n, hits and counts."""
        if not self.enabled:
            return m
        sums = torch.tensor(
            [m.loss * m.count, m.top1 * m.count, m.top5 * m.count, m.count],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(sums)
        loss, top1, top5, count = sums.tolist()
        n = max(count, 1)
        return Metrics(loss / n, round(top1) / n, round(top5) / n, round(count))

    # ----------------------------------------------------------------------- coordination

    def from_main(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on rank 0 only and hand its result (or its error) to every rank."""
        if not self.enabled:
            return fn(*args)
        box: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn(*args))
            except Exception as exc:  # every rank must hear of it, or the others hang
                error = exc
                shared = exc if isinstance(exc, EANetError) else EANetError(f"rank 0: {exc}")
                box[0] = ("error", shared)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if error is not None:
            raise error
        if status == "error":
            raise value
        return value

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Local rank 0 goes first (a download, a cache), the node's other ranks after it."""
        if not self.enabled:
            yield
            return
        if self.local_rank != 0:
            self._barrier()
        yield
        if self.local_rank == 0:
            self._barrier()

    def _barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def _derive_seed(seed: int, epoch: int, rank: int) -> int:
    """A 63-bit seed for (seed, epoch, rank), unrelated to its neighbours."""
    digest = hashlib.sha256(f"eanet/{seed}/{epoch}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _ddp_device(name: str, local_rank: int) -> torch.device:
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK {local_rank} has no GPU (this node has {count}); start at most "
            f"{count} processes per node (torchrun --nproc_per_node {count})"
        )
    if device.index not in (None, local_rank):
        log.warning("under torchrun each process uses cuda:LOCAL_RANK; ignoring %s", name)
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def _attempt_store() -> dist.Store:
    """torchrun's store, seen under a prefix of this attempt (TORCHELASTIC_RESTART_COUNT).

    torchrun's agent keeps one TCP store for every attempt of a group (its shared
    rendezvous store, the default since torch 2.5) and `init_process_group` writes its keys
    there unprefixed, so after a restart a rank can read the addresses of the dead group's
    ranks: gloo then waits forever or is refused (pytorch/pytorch#135712; seen here as a
    restarted 2-rank group stuck in `init_process_group`). Each attempt gets its own keys.
    """
    store, _, _ = next(dist.rendezvous("env://"))  # torch's choice of client or server
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"eanet/attempt-{attempt}", store)


def setup(device: str = "auto") -> Distributed:
    """This process's place: the caller's process group, torchrun's, or a single process.

    Under torchrun (RANK/WORLD_SIZE in the environment) the group is created here, with
    nccl when the device is a GPU and gloo on the CPU; `close` destroys it. A group the
    caller already created (e.g. with torch.multiprocessing) is used and left alone.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return Distributed(rank, world, local, _ddp_device(device, local), enabled=True)
    if not launched_by_torchrun():
        return Distributed(device=resolve_device(device))
    if not dist.is_available():
        raise EANetError("this torch build has no torch.distributed; train in one process")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = _ddp_device(device, local)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    try:
        store = _attempt_store()
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    except (ValueError, RuntimeError) as exc:
        raise EANetError(
            f"cannot join the process group as rank {rank} of {world} ({exc}); "
            "launch with torchrun, which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE"
        ) from exc
    log.info("rank %d of %d, %s on %s", rank, world, backend, dev)
    return Distributed(rank, world, local, dev, enabled=True, owned=True)
