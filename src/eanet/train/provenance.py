"""Determinism and provenance: repeatable runs, and what config.json records to redo one."""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eanet import __version__

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"


def configure_determinism(enabled: bool) -> None:
    """--deterministic: the flags torch needs for repeatable runs (global to the process).

    CUBLAS_WORKSPACE_CONFIG must be set before cuBLAS starts, i.e. before the first CUDA
    matrix product of the process; if CUDA already ran without it, a warning says so.
    """
    if not enabled:
        return
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            log.warning(
                "CUDA started before --deterministic set CUBLAS_WORKSPACE_CONFIG; set "
                "CUBLAS_WORKSPACE_CONFIG=%s in the environment for deterministic matmuls",
                CUBLAS_WORKSPACE,
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@functools.cache
def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout the package runs from; (None, None) otherwise.

    The package's own files must be tracked by that checkout, so an installed copy inside
    some other repository (a virtual environment in a project) does not report its commit.
    """
    package = Path(__file__).resolve().parent.parent  # eanet/
    if _git(["ls-files", "--error-unmatch", "__init__.py"], package) is None:
        return None, None
    commit = _git(["rev-parse", "HEAD"], package)
    if commit is None:
        return None, None
    status = _git(["status", "--porcelain", "--untracked-files=no", "--", "."], package)
    return commit, (bool(status) if status is not None else None)


def provenance(cfg: Any, device: torch.device | str) -> dict:
    """What a run's config.json records to redo it: versions, seed, device, determinism."""
    commit, dirty = git_commit()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "eanet": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "seed": cfg.seed,
        "device": str(device),
        "deterministic": bool(cfg.deterministic),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
