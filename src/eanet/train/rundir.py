"""The run directory: its files, refusing to clobber one, history files, the saved config."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from eanet import __version__, checkpoint
from eanet.errors import ConfigError, EANetError
from eanet.fileio import read_json, remove_stale_temp_files, write_csv, write_json, write_text
from eanet.locks import COMPARE_LOCK, RUN_LOCK, directory_lock
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
    never delete the first one's save in progress. The directory is removed after a failed
    start only by the process that created it (an atomic mkdir says which) and holds its
    lock: a process refused by the lock never deletes the winner's run.
    """
    if resume:
        _check_resumable(out)  # before the lock creates the directory
    created = _make_dir(out)
    held.enter_context(directory_lock(out, RUN_LOCK))
    if created:  # pushed after the lock: it runs while the lock is still held
        held.push(lambda kind, exc, tb: _remove_unstarted(out, exc))
    prepare_run_dir(out, resume, overwrite)


def _make_dir(out: Path) -> bool:
    """Create `out` (and its parents); True if this call created it, False if it was there."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            out.mkdir()
        except FileExistsError:
            return False
    except OSError as exc:
        raise EANetError(f"cannot write to run directory {out}: {exc.strerror or exc}") from exc
    return True


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
    history, ...) or over a lock file, even with --overwrite: evaluate, --resume and compare
    read the one, and the other is what keeps a second process out of a directory."""
    path = Path(path)
    if path.name in (RUN_LOCK, COMPARE_LOCK):
        raise EANetError(
            f"{path} is the lock file of the directory {path.parent}; replacing it would let "
            "a second process in: choose another file name"
        )
    if path.name in RUN_FILES and (path.parent / "config.json").is_file():
        raise EANetError(
            f"{path} is the {path.name} of the run in {path.parent}; replacing it would break "
            "the run (evaluate, --resume): choose a file outside the run's own names"
        )


def is_run(out: Path) -> bool:
    """Whether `out` holds a training run: its config.json or its checkpoint."""
    return (out / "config.json").is_file() or (out / checkpoint.CHECKPOINT_NAME).is_file()


def refuse_input_in_run(out: Path, inputs: Iterable[str | Path], flag: str) -> None:
    """Refuse a new run in `out` that would replace one of the files it reads (`--config
    RUN/config.yaml --out RUN --overwrite`): read first, then deleted with the old run. (A
    folder that is no run is refused whole by `check_new_run`.)"""
    if not is_run(Path(out)):
        return
    for source in inputs:
        path = Path(source)
        if path.name in RUN_FILES and path.resolve().parent == Path(out).resolve():
            raise EANetError(
                f"{flag} {source} is the {path.name} of {out}, which a new run there replaces: "
                f"copy it outside {out} first, or choose another --out"
            )


def _check_resumable(out: Path) -> None:
    if not (out / checkpoint.CHECKPOINT_NAME).is_file():
        raise EANetError(
            f"{out}: nothing to resume (no {checkpoint.CHECKPOINT_NAME}); "
            "start a new run with --out"
        )


def finished_epochs(out: Path, epochs: int) -> int | None:
    """The epochs of a run that trained and tested at least `epochs`: its metrics.json and
    its training checkpoint say the same epoch; None when it has more to do."""
    try:
        done = read_json(out / "metrics.json").get("epochs")
        saved = checkpoint.load(out).meta.epoch  # a weights-only file has none
    except EANetError:  # no metrics yet, or a damaged file: the run goes on (and says why)
        return None
    finished = isinstance(done, int) and done == saved and done >= epochs
    return done if finished else None


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; check the directory is writable.

    Temporary files that a killed writer left beside the run files are deleted: call it
    only while holding the directory's lock (`claim_run_dir`).
    """
    if resume:
        _check_resumable(out)
    else:
        _clear_for_new_run(out, overwrite)
    remove_stale_temp_files(out, RUN_FILES)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise EANetError(f"cannot write to run directory {out}: {exc.strerror or exc}") from exc


def check_new_run(out: Path, overwrite: bool) -> list[str]:
    """Refuse a new run in `out` unless it is new or empty, or a run and `overwrite` is
    given; the names of the old run's files that the new run replaces (none are deleted)."""
    if not is_run(out):
        found = sorted(_foreign(out))
        if found:
            shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
            raise EANetError(
                f"{out} is not an eanet run and is not empty ({shown}); a new run goes into a "
                "new or empty directory: choose another --out"
            )
        return []
    names = (*RUN_FILES, *RUN_DIRS, *EVALUATION_FILES)
    existing = [name for name in names if os.path.lexists(out / name)]
    if not overwrite:
        raise EANetError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume "
            f"{out} to continue it, --overwrite to start over, or another --out"
        )
    return existing


def _clear_for_new_run(out: Path, overwrite: bool) -> None:
    """Delete the old run's own files (never anything else: a folder that is not a run is
    refused), after `check_new_run`."""
    for name in check_new_run(out, overwrite):  # no mixed runs
        _remove(out / name)


def _foreign(out: Path) -> list[str]:
    """The entries of `out` other than its lock and a killed writer's temporary files."""
    if not out.is_dir():
        return []
    return [
        p.name
        for p in out.iterdir()
        if p.name not in (RUN_LOCK, ".write-test")
        and not (p.name.startswith(".") and p.name.endswith(".tmp"))
    ]


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
