"""Throughput and memory of the training step and of inference, measured the same way everywhere.

Warm-up steps are excluded and the median of the timed steps is reported. The training
step is the one `eanet train` runs (augmentation, forward, label-smoothed loss, backward,
AdamW), on random CIFAR-shaped uint8 data held on the device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from eanet import accel
from eanet.accel import native
from eanet.data.augment import AugmentConfig
from eanet.errors import ConfigError
from eanet.inference import Runtime
from eanet.models.registry import count_parameters, create_model
from eanet.models.transformer import VisionTransformer
from eanet.runtime import (
    autocast,
    environment,
    native_bf16,
    resolve_device,
    set_threads,
    tune_cpu_allocator,
)
from eanet.train.augmentation import BatchAugment
from eanet.train.config import TrainConfig
from eanet.train.step import accelerate, make_optimizer, train_step

log = logging.getLogger(__name__)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> list[float]:
    """Seconds per call of `fn` for `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_gflops(
    device: torch.device,
    n: int = 2048,
    repeats: int = 5,
    dtype: torch.dtype = torch.float32,
    budget_s: float = 0.25,
) -> float:
    """GFLOP/s of a large square matmul in `dtype`: this machine's practical ceiling.

    The side doubles from 256 towards `n` while the next product (8x the work) would fit in
    `budget_s`, so a dtype the CPU only emulates (bf16 without avx512_bf16 or AMX, about 100x
    slower) is measured in seconds rather than minutes, at the largest size that fits.
    """

    def product(side: int) -> Callable[[], torch.Tensor]:
        a = torch.randn(side, side, device=device).to(dtype)
        b = torch.randn(side, side, device=device).to(dtype)
        return lambda: a @ b

    with _tf32(device, enabled=False):
        side = min(256, n)
        # the next size costs 8x as much
        while side < n and 8 * min(time_calls(product(side), device, 1, 1)) <= budget_s:
            side *= 2
        times = time_calls(product(side), device, warmup=1, repeats=repeats)
    return 2 * side**3 / statistics.median(times) / 1e9


@contextlib.contextmanager
def _tf32(device: torch.device, enabled: bool):
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def macs_per_image(model: VisionTransformer, device: torch.device) -> float:
    """Forward multiply-adds per image of the reference formulation, by FlopCounterMode.

    Counted on the reference's ops (the fast path folds M_k and M_v away and does less),
    so the figure is the model's, comparable across implementations. A training step is
    counted as 3x the forward (backward = 2x forward), the usual convention.
    """
    batch = 2
    x = torch.randint(0, 256, (batch, *model.input_shape), dtype=torch.uint8, device=device)
    plain = accel.restore(copy.deepcopy(model)).train()  # train mode: dropout is no matmul
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plain(x)
    return counter.get_total_flops() / 2 / batch


def _peak_memory_mb(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_memory_kind": "cuda max_memory_allocated",
        }
    # ru_maxrss is KiB on Linux: the process's peak resident memory, everything included.
    return {
        "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_memory_kind": "process peak RSS",
    }


@dataclass
class BenchResult:
    """What `eanet bench` measured for one model: throughput, cost, peaks and machine."""

    model: str
    batch_size: int
    device: str
    precision: str  # resolved: what the timed steps ran in
    compile: bool
    params: int
    warmup: int
    steps: int
    train_img_s: float
    infer_img_s: float
    train_step_s: list[float]
    infer_step_s: list[float]
    forward_macs_per_image: float
    train_macs_per_image: float
    train_gflops: float
    infer_gflops: float
    matmul_peak_gflops: float  # fp32
    matmul_peak_bf16_gflops: float | None  # None where it was not measured
    train_fraction_of_peak: float  # of the matmul peak in `precision`
    infer_fraction_of_peak: float
    peak_memory_mb: float
    peak_memory_kind: str
    native_kernels: dict = field(default_factory=dict)  # accel.native.status() on the CPU
    accel: dict | None = None  # eanet.accel.apply's report; None: the plain model (--no-accel)
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _bench_data(model: VisionTransformer, batch_size: int, dev: torch.device):
    x = torch.randint(0, 256, (batch_size, *model.input_shape), dtype=torch.uint8, device=dev)
    y = torch.randint(0, model.config.num_classes, (batch_size,), device=dev)
    return x, y


def _set_realistic_stats(model: VisionTransformer) -> None:
    """CIFAR-100-like normalization statistics (their grey mean for a 1-channel model), so
    activations have realistic magnitudes."""
    mean = torch.tensor([129.3, 124.1, 112.4])
    var = torch.tensor([4597.0, 4231.0, 5013.0])
    if model.config.in_chans != 3:
        mean = mean.mean().expand(model.config.in_chans)
        var = var.mean().expand(model.config.in_chans)
    model.normalize.set_stats(mean, var, 1)


def bench_model(
    cfg: TrainConfig,
    warmup: int = 3,
    steps: int = 10,
    peak: float | None = None,
    peak_bf16: float | None = None,
) -> BenchResult:
    """Training-step and inference throughput (images/s, median of `steps`) of `cfg`'s model.

    The training step is `train.step.train_step` with `cfg` (its precision, augmentation,
    compile via `train.step.accelerate`): exactly what `eanet train` runs with the same
    options. Inference runs in `cfg.precision` under inference mode, as `predict` does.
    """
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps} must be >= 1 and --warmup {warmup} >= 0")
    set_threads(cfg.threads)
    rt = Runtime.resolve(cfg.device, cfg.precision, cfg.accel, cfg.compile, cfg.compile_mode)
    dev, precision = rt.device, rt.precision
    tune_cpu_allocator()
    torch.manual_seed(0)
    model = create_model(cfg.model, **cfg.model_args)
    _set_realistic_stats(model)
    report = rt.place(model)  # on the device, eanet.accel applied; compiled by `accelerate`
    optimizer = make_optimizer(model, cfg)
    runner = accelerate(model, cfg, dev)
    x, y = _bench_data(model, cfg.batch_size, dev)
    aug = AugmentConfig()
    batch_augment = BatchAugment.from_config(cfg, aug)  # as train_epoch: decided once
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    train_times = time_calls(
        lambda: train_step(runner, optimizer, x, y, cfg, aug, batch_augment=batch_augment),
        dev,
        warmup,
        steps,
    )
    train_mem = _peak_memory_mb(dev)
    model.eval()

    @torch.inference_mode()
    def infer() -> None:
        with autocast(precision, dev):
            runner(x)

    infer_times = time_calls(infer, dev, warmup, steps)
    fwd_macs = macs_per_image(model, dev)
    peak = peak or matmul_peak_gflops(dev)
    if peak_bf16 is None and (precision == "bf16" or native_bf16(dev)):
        peak_bf16 = matmul_peak_gflops(dev, dtype=torch.bfloat16)
    ceiling = peak_bf16 if precision == "bf16" and peak_bf16 else peak
    train_img_s = cfg.batch_size / statistics.median(train_times)
    infer_img_s = cfg.batch_size / statistics.median(infer_times)
    train_gflops = 2 * 3 * fwd_macs * train_img_s / 1e9
    infer_gflops = 2 * fwd_macs * infer_img_s / 1e9
    return BenchResult(
        model=cfg.model,
        batch_size=cfg.batch_size,
        device=str(dev),
        precision=precision,
        compile=cfg.compile,
        params=count_parameters(model),
        warmup=warmup,
        steps=steps,
        train_img_s=train_img_s,
        infer_img_s=infer_img_s,
        train_step_s=train_times,
        infer_step_s=infer_times,
        forward_macs_per_image=fwd_macs,
        train_macs_per_image=3 * fwd_macs,
        train_gflops=train_gflops,
        infer_gflops=infer_gflops,
        matmul_peak_gflops=peak,
        matmul_peak_bf16_gflops=peak_bf16,
        train_fraction_of_peak=train_gflops / ceiling,
        infer_fraction_of_peak=infer_gflops / ceiling,
        **train_mem,
        native_kernels=native.status() if dev.type == "cpu" and cfg.accel else {},
        accel=None if report is None else report.to_dict(),
        environment=environment(),
    )


# --------------------------------------------------------------------------- token scaling


def saved_activation_bytes(model: VisionTransformer, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one training forward (the activation memory)."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return total


def scaling(
    sizes: tuple[int, ...] = (32, 48, 64, 96),
    models: tuple[str, ...] = ("eanet-cifar", "vit-cifar"),
    patch_size: int = 2,
    batch_size: int = 2,
    device: str = "auto",
    warmup: int = 1,
    steps: int = 3,
    progress: bool = True,
) -> list[dict]:
    """Time and activation memory per image of EA and SA as the token count grows."""
    from tqdm.auto import tqdm

    dev = resolve_device(device)
    peak = matmul_peak_gflops(dev)  # once, not once per configuration
    rows = []
    jobs = [(s, m) for s in sizes for m in models]
    for size, name in tqdm(jobs, desc="scaling", disable=not progress):
        shape = {"image_size": size, "patch_size": patch_size}
        cfg = TrainConfig(
            model=name, model_args=shape, batch_size=batch_size, device=device, augment="none"
        )
        r = bench_model(cfg, warmup=warmup, steps=steps, peak=peak)
        torch.manual_seed(0)
        model = create_model(name, **shape).to(dev)
        x = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, device=dev)
        rows.append(
            {
                "model": name,
                "image_size": size,
                "tokens": (size // patch_size) ** 2,
                "train_ms_per_image": 1e3 / r.train_img_s,
                "infer_ms_per_image": 1e3 / r.infer_img_s,
                "activation_mb_per_image": saved_activation_bytes(model, x) / 2**20,
                "forward_gmacs_per_image": r.forward_macs_per_image / 1e9,
            }
        )
    return rows
