"""The run directory: its files, refusing to clobber one, history files, the saved config."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from eanet import __version__, checkpoint
from eanet.errors import ConfigError, EANetError
from eanet.fileio import read_json, remove_stale_temp_files, write_csv, write_json, write_text
from eanet.locks import RUN_LOCK, directory_lock
from eanet.options import to_yaml
from eanet.plots import plot_curves
from eanet.train.config import TrainConfig

log = logging.getLogger(__name__)

RUN_FILES = (
    "config.json",
    "config.yaml",
    "history.json",
    "history.csv",
    "curves.png",
    "metrics.json",
    checkpoint.CHECKPOINT_NAME,
    checkpoint.BEST_NAME,
)
RUN_DIRS = ("tensorboard",)  # --log tensorboard's events
# What `eanet evaluate` writes into a run (`evaluate_checkpoint`: STEM_SPLIT[_WEIGHTS].EXT):
# they describe the old weights, so --overwrite removes them with the run.
EVALUATION_FILES = tuple(
    f"{stem}_{split}{weights}.{ext}"
    for split in ("test", "val")
    for weights in ("", "_best", "_ema")
    for stem, ext in (("per_class", "csv"), ("confusion", "png"), ("evaluation", "json"))
)


def claim_run_dir(held: contextlib.ExitStack, out: Path, resume: bool, overwrite: bool) -> None:
    """Lock the run directory for this process (until `held` closes), then prepare it.

    A second eanet on the same directory is refused in one line ("run directory in use by
    PID N"); only the lock's holder cleans up temporary files, so a second `--resume` can
    never delete the first one's save in progress.
    """
    if resume:
        _check_resumable(out)  # before the lock creates the directory
    if not out.exists():  # pushed first, so it runs after the lock is released
        held.push(lambda kind, exc, tb: _remove_unstarted(out, exc))
    held.enter_context(directory_lock(out, RUN_LOCK))
    prepare_run_dir(out, resume, overwrite)


def _remove_unstarted(out: Path, exc: BaseException | None) -> bool:
    """After a run that failed before its first checkpoint: delete the directory it created
    (only its own files are in it), so a bad option leaves nothing behind. False: the
    exception goes on."""
    if exc is None or (out / checkpoint.CHECKPOINT_NAME).exists():
        return False
    try:
        shutil.rmtree(out)
    except OSError as err:
        log.warning("cannot remove the unfinished run directory %s: %s", out, err.strerror or err)
    return False


def refuse_run_file(path: str | Path) -> None:
    """Refuse to write anything else over a file of a training run (its checkpoint, config,
    history, ...), even with --overwrite: evaluate, --resume and compare read them."""
    path = Path(path)
    if path.name in RUN_FILES and (path.parent / "config.json").is_file():
        raise EANetError(
            f"{path} is the {path.name} of the run in {path.parent}; replacing it would break "
            "the run (evaluate, --resume): choose a file outside the run's own names"
        )


def _check_resumable(out: Path) -> None:
    if not (out / checkpoint.CHECKPOINT_NAME).is_file():
        raise EANetError(
            f"{out}: nothing to resume (no {checkpoint.CHECKPOINT_NAME}); "
            "start a new run with --out"
        )


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; check the directory is writable.

    Temporary files that a killed writer left beside the run files are deleted: call it
    only while holding the directory's lock (`claim_run_dir`).
    """
    if resume:
        _check_resumable(out)
    else:
        names = (*RUN_FILES, *RUN_DIRS, *EVALUATION_FILES)
        existing = [name for name in names if (out / name).exists()]
        if existing and not overwrite:
            raise EANetError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume "
                f"{out} to continue it, --overwrite to start over, or another --out"
            )
        for name in existing:  # everything the previous run wrote: no mixed runs
            _remove(out / name)
    remove_stale_temp_files(out, RUN_FILES)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise EANetError(f"cannot write to run directory {out}: {exc.strerror or exc}") from exc


def _remove(path: Path) -> None:
    """Delete a previous run's file or folder (a link itself, never what it points to)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        raise EANetError(
            f"cannot remove {path} of the previous run: {exc.strerror or exc}; "
            "remove it yourself or choose another --out"
        ) from exc


def write_run_config(out: Path, cfg: TrainConfig, record: dict) -> None:
    """config.json (the options and what else the run recorded) and config.yaml (the options).

    `eanet train --config RUN/config.yaml --out OTHER` trains the same run again.
    """
    write_json(out / "config.json", {"train": cfg.to_dict(), **record})
    header = (
        f"eanet {__version__} training options of {out}\n"
        f"reproduce: eanet train --config {out / 'config.yaml'} --out OTHER_DIR"
    )
    write_text(out / "config.yaml", to_yaml(cfg.to_dict(), header))


def write_history(out: Path, history: list[dict], title: str, classes: int | None = None) -> None:
    """history.json, history.csv and curves.png (top-5 shown with more than 5 `classes`)."""
    write_json(out / "history.json", history)
    write_csv(out / "history.csv", history)
    plot_curves(history, out / "curves.png", title=title, classes=classes)


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in a run directory's config.json."""
    data = read_json(Path(run_dir) / "config.json")
    if "train" not in data:
        raise EANetError(f"{run_dir}/config.json has no 'train' section; it is not a run")
    try:
        return TrainConfig.from_dict(data["train"])
    except ConfigError as exc:
        raise ConfigError(
            f"{Path(run_dir) / 'config.json'}: {exc}; correct the file (or start a new run)"
        ) from exc
