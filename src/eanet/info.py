"""What a model is made of: parameters per layer, multiply-adds per image, configuration.

Multiply-adds (MACs) are counted analytically from the config: every Linear layer
(tokens x in x out; the memories M_k and M_v of external attention act on tokens x heads
rows) and the two attention matmuls of self-attention (QK^T and AV, heads x N x N x
key_dim each). Elementwise work (LayerNorm, softmax, GELU, the double normalisation) is not
counted, as torch's FlopCounterMode does not count it; `tests/test_info.py` checks the sum
against FlopCounterMode (FLOPs / 2). It is the count of the architecture as the reference
computes it; a forward pass that folds consecutive linear maps together executes fewer.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from eanet import checkpoint
from eanet.errors import ConfigError, printable
from eanet.fileio import SHIPPED_MODELS, shipped_model
from eanet.models.config import ModelConfig
from eanet.models.layers import SelfAttention
from eanet.models.registry import MODELS, count_parameters, create_model
from eanet.models.transformer import VisionTransformer
from eanet.options import declared, range_text
from eanet.runtime import cpu_info, resolve_device, resolve_precision


def _rows_of(name: str, cfg: ModelConfig) -> int:
    """How many vectors a Linear layer multiplies per image."""
    if name == "head":
        return 1  # after the mean over tokens
    if name.endswith((".mk", ".mv")):
        return cfg.num_patches * cfg.num_heads * cfg.dim_coefficient  # every token of every head
    return cfg.num_patches


def _shape(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    if isinstance(module, nn.LayerNorm):
        return "x".join(map(str, module.normalized_shape))
    own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
    return ", ".join(f"{n} {'x'.join(map(str, t.shape)) or 'scalar'}" for n, t in own)


def layer_table(model: VisionTransformer) -> list[dict]:
    """One row per module that holds parameters or buffers, or does attention matmuls."""
    cfg = model.config
    rows = []
    for name, module in model.named_modules():
        params = sum(p.numel() for p in module.parameters(recurse=False))
        buffers = sum(b.numel() for b in module.buffers(recurse=False))
        macs = 0
        if isinstance(module, nn.Linear):
            macs = _rows_of(name, cfg) * module.in_features * module.out_features
        elif isinstance(module, SelfAttention):
            macs = 2 * module.heads * cfg.num_patches**2 * module.key_dim  # QK^T and AV
        if not (params or buffers or macs):
            continue
        rows.append(
            {
                "layer": name,
                "type": type(module).__name__,
                "shape": _shape(module),
                "parameters": params,
                "statistics": buffers,
                "macs": macs,
            }
        )
    return rows


def model_info(model: VisionTransformer, name: str | None = None) -> dict:
    """Per-layer table, totals, MACs per image and the config of `model`."""
    layers = layer_table(model)
    trainable = count_parameters(model)
    stats = sum(b.numel() for b in model.buffers())
    macs = sum(r["macs"] for r in layers)
    return {
        "model": name,
        "layers": layers,
        "trainable_parameters": trainable,
        "normalization_statistics": stats,
        "total_parameters": count_parameters(model, trainable_only=False) + stats,
        "macs_per_image": macs,
        "config": model.config.to_dict(),
    }


def describe(target: str | Path, **overrides: object) -> dict:
    """model_info of a registered model name (with config overrides) or of a checkpoint."""
    text = str(target)
    if text in MODELS:
        return model_info(create_model(text, **overrides), text)
    path = Path(text)
    if not path.exists() and shipped_model(text) is None:
        raise ConfigError(
            f"{text!r} is neither a registered model ({', '.join(MODELS)}) nor a checkpoint, "
            f"run directory or shipped model ({', '.join(SHIPPED_MODELS)}); check the name or path"
        )
    if overrides:
        raise ConfigError("--model-arg applies to a model name, not to a checkpoint")
    model, ckpt = checkpoint.load_model(path)
    info = model_info(model, ckpt.meta.model_name)
    info["checkpoint"] = {
        "path": str(checkpoint.resolve(path)),
        "classes": len(ckpt.class_names),
        "class_names": ckpt.class_names,
        "epoch": ckpt.meta.epoch,
        "train_config": ckpt.meta.train_config,
        "trained_by": ckpt.meta.extra.get("trained_by"),  # a shipped model's run
        "test": ckpt.meta.extra.get("test"),
    }
    return info


def format_info(info: dict) -> str:
    """The info dict as a text table."""
    cfg = info["config"]
    lines = []
    title = printable(info["model"] or "model")  # a checkpoint's name: text from a file
    if title in MODELS:  # name the fields that differ from the registered variant
        base = MODELS[title].config.to_dict()
        changed = [f"{k}={v}" for k, v in cfg.items() if base.get(k) != v]
        title += f" ({', '.join(changed)})" if changed else ""
    kind = (
        "external attention (EANet)" if cfg["attention"] == "external" else "self-attention (ViT)"
    )
    lines.append(
        f"{title}: {kind}, input {cfg['in_chans']}x{cfg['image_size']}x{cfg['image_size']}, "
        f"{cfg['num_classes']} classes"
    )
    if "checkpoint" in info:
        c = info["checkpoint"]
        lines.append(
            f"checkpoint {printable(c['path'])} (epoch {c['epoch']}, {c['classes']} classes)"
        )
        if c.get("trained_by") and c.get("test"):  # a shipped model: where it comes from
            t = c["test"]
            lines.append(
                f"trained by {printable(str(c['trained_by']))}; test top-1 "
                f"{t['test_top1']:.2%}, top-5 {t['test_top5']:.2%} on {t['test_images']:,} images"
            )
    width = max(len(r["layer"]) for r in info["layers"]) + 2
    lines.append("")
    lines.append(f"{'layer':<{width}}{'type':<20}{'shape':<28}{'parameters':>12}{'MACs':>14}")
    for r in info["layers"]:
        params = f"{r['parameters']:,}" if r["parameters"] else ""
        if r["statistics"]:
            params = (params + " + " if params else "") + f"{r['statistics']} stats"
        macs = f"{r['macs']:,}" if r["macs"] else ""
        lines.append(f"{r['layer']:<{width}}{r['type']:<20}{r['shape']:<28}{params:>12}{macs:>14}")
    total_w = width + 20 + 28
    lines.append("")
    lines.append(f"{'trainable parameters':<{total_w}}{info['trainable_parameters']:>12,}")
    lines.append(
        f"{'normalization statistics (mean, var, count)':<{total_w}}"
        f"{info['normalization_statistics']:>12,}"
    )
    lines.append(f"{'total (as Keras model.summary)':<{total_w}}{info['total_parameters']:>12,}")
    lines.append(
        f"{'multiply-adds per image (forward)':<{total_w}}{'':>12}{info['macs_per_image']:>14,}"
        f"  ({info['macs_per_image'] / 1e9:.3f} G)"
    )
    if "machine" in info:
        m = info["machine"]
        native = m["native_kernels"]
        kernels = ", ".join(native["on"]) or "none" if native else "none (GPU)"
        lines.append(
            f"on this machine: --precision auto -> {m['precision_auto']} on "
            f"{m['device']}; native kernels (--accel): {kernels}"
        )
    return "\n".join([*lines, "", *_config_lines(cfg)])


def _config_lines(cfg: dict) -> list[str]:
    """The model options, one a line: its value, what it means and its range."""
    fields = declared(ModelConfig)
    width = max(len(f"{k}={v}") for k, v in cfg.items()) + 2
    lines = ["config (change a field with --model-arg KEY=VALUE):"]
    for key, value in cfg.items():
        about = ""
        if key in fields:  # always, for a config this version reads
            bounds = range_text(ModelConfig, key)
            about = fields[key].metadata["help"] + (f"; {bounds}" if bounds else "")
        lines.append(f"  {f'{key}={value}':<{width}}{about}".rstrip())
    return lines


def machine_info() -> dict:
    """What this machine computes with: torch, CPU flags, threads, precision, native kernels."""
    from eanet.accel import native

    device = resolve_device("auto")
    model, flags = cpu_info()
    cache = native.cache_dir()
    return {
        "torch": torch.__version__,
        "cpu_model": model,
        "cpu_flags": list(flags),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": str(device),
        "precision_auto": resolve_precision("auto", device),
        "native_kernels": native.status() if device.type == "cpu" else None,
        "kernel_cache": str(cache) if cache else None,
        "kernel_cache_from": "EANET_KERNELS" if os.environ.get("EANET_KERNELS") else "default",
    }


def format_machine(m: dict) -> str:
    """machine_info as lines of text."""
    flags = " ".join(m["cpu_flags"]) or "none of avx2, avx512f, avx512_bf16, amx"
    lines = [
        f"torch {m['torch']}, {m['torch_threads']} threads, kernels {m['cpu_capability']}",
        f"CPU {printable(m['cpu_model'] or 'unknown')}; flags: {flags}",
        f"GPU {printable(m['cuda'])}" if m["cuda"] else "GPU none (CUDA not available)",
        f"--device auto -> {m['device']}; --precision auto -> {m['precision_auto']}",
    ]
    native = m["native_kernels"]
    if native is None:
        lines.append("native CPU kernels: not used on a GPU")
    else:
        threads = " (OpenMP)" if native["openmp"] else ""
        on = ", ".join(native["on"]) + threads if native["on"] else "off (torch's ops)"
        lines.append(f"native CPU kernels (--accel): {on}")
    if m["kernel_cache"] is None:
        lines.append("kernel cache: none (set EANET_KERNELS to a directory of your own)")
    elif m["kernel_cache_from"] == "EANET_KERNELS":
        lines.append(f"kernel cache: {printable(m['kernel_cache'])} (from EANET_KERNELS)")
    else:
        lines.append(f"kernel cache: {printable(m['kernel_cache'])} (EANET_KERNELS moves it)")
    return "\n".join(lines)
