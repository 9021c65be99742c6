"""``--train.resume false`` on a directory that already holds a run: refused, or (``--train.overwrite``) that
run is moved aside whole, so two runs never mix their checkpoints and metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.train.run_lock import LOCK_FILE

# What a run leaves in its directory (the lock and a Slurm job's own files are not the run's training state).
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "wandb", "wandb_run_id", "DONE", "REQUEUE")
KEPT = (LOCK_FILE, "slurm")


def holds_training(out_dir: Path) -> bool:
    return any((Path(out_dir) / name).exists() for name in RUN_ENTRIES)


def check_start_over(out_dir: Path, overwrite: bool) -> None:
    """Refuse a new run (``--train.resume false``) in a directory that holds one, unless ``overwrite``."""
    if holds_training(out_dir) and not overwrite:
        raise ConfigError(
            f"--train.resume false: {out_dir} already holds a run (checkpoints or metrics); a new run there would "
            "mix with it. Pass --train.overwrite true to move that run aside (nothing is deleted), or use a new "
            "--train.out_dir")


def check_writable(out_dir: Path) -> None:
    """The run directory exists and can be written, or can be made: checked without making it."""
    folder = Path(out_dir).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"--train.out_dir {out_dir}: {existing} is a file, where the directory (or one of its "
                          "parents) would be; choose another --train.out_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--train.out_dir {out_dir}: {existing} is not writable; choose a directory you can write")


def start_over(out_dir: Path, overwrite: bool) -> Path | None:
    """Make ``out_dir`` free for a fresh run: nothing to do, a refusal, or (``overwrite``) everything of the
    old run moved into ``OUT_DIR.replaced-<time>`` next to it (returned). Call with the run lock held."""
    out_dir = Path(out_dir)
    check_start_over(out_dir, overwrite)
    if not holds_training(out_dir):
        return None
    aside = out_dir.with_name(f"{out_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 0
    while aside.exists():
        suffix += 1
        aside = aside.with_name(f"{aside.name.split('~')[0]}~{suffix}")
    aside.mkdir()
    for entry in sorted(out_dir.iterdir()):
        if entry.name not in KEPT:
            entry.rename(aside / entry.name)
    return aside
