"""What a folder holds, so that no tool's ``--overwrite`` deletes a user's work.

A tool that writes a folder records itself in ``.memdlm-output.json``; it may replace a folder only if that
folder is empty or is its own earlier output. A training run, a prepared dataset, a checkpoint or anything
else is refused, with what it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import UsageError

MARKER = ".memdlm-output.json"


def write_marker(folder: Path, tool: str) -> None:
    """Record that ``tool`` wrote ``folder``."""
    (Path(folder) / MARKER).write_text(json.dumps({"tool": tool}) + "\n")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def describe(folder: Path) -> str:
    """``missing``, ``empty``, ``run``, ``checkpoint``, ``dataset``, ``output of TOOL`` or ``other``."""
    folder = Path(folder)
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "other"
    if not any(folder.iterdir()):
        return "empty"
    if any((folder / name).exists() for name in ("checkpoints", "metrics.jsonl", "run.lock", "DONE", "REQUEUE")):
        return "run"
    manifest = _json(folder / "manifest.json")
    if str(manifest.get("format", "")).startswith("memdlm-dcp"):
        return "checkpoint"
    if "formats" in manifest and "num_samples" in manifest:
        return "dataset"
    tool = _json(folder / MARKER).get("tool")
    return f"output of {tool}" if tool else "other"


WHAT = {"run": "a training run (checkpoints and metrics)", "checkpoint": "a checkpoint",
        "dataset": "a prepared dataset", "other": "a folder this tool did not write"}


def check_replaceable(folder: Path, tool: str, overwrite: bool, own_kind: str | None = None) -> None:
    """Refuse to write ``folder`` unless it is missing or empty, or (with ``overwrite``) it is ``tool``'s
    own earlier output (or, for ``own_kind``, that kind of folder: a dataset for memdlm-prepare-data)."""
    kind = describe(folder)
    if kind in ("missing", "empty"):
        return
    own = kind == f"output of {tool}" or (own_kind is not None and kind == own_kind)
    if own and overwrite:
        return
    if own:
        raise UsageError(f"{folder} holds an earlier output of {tool}; pass --overwrite to replace it, or choose "
                         "another directory")
    what = WHAT.get(kind, f"the {kind.removeprefix('output of ')} output")
    raise UsageError(f"{folder} is {what}, not an earlier output of {tool}: it is never replaced, not even with "
                     "--overwrite; choose another directory (or move it aside yourself)")
