"""What makes a checkpoint folder complete and intact, and how to find one.

``OUT_DIR/checkpoints/step_NNNNNN/manifest.json`` is written last: the format, the step, and the size and
sha256 of every other file of the folder. A folder without it, with a file missing, of another size or
(unless switched off) another sha256 is not a usable checkpoint; ``check_checkpoint`` says which file
is wrong and how. ``latest`` (one line) names the newest complete checkpoint of a run.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.errors import UsageError

LATEST = "latest"
MANIFEST = "manifest.json"
FORMAT = "memdlm-dcp-2"  # train_state.json and tensor-only RNG files (memdlm-dcp-1: pickled trainer_state.pt)


class CheckpointError(UsageError):
    """No usable checkpoint where one was expected; the message says what is wrong with each."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, files: list[str], hashes: bool = True, threads: int = 8) -> dict[str, dict]:
    """``{file: {"size", "sha256"}}`` for ``files`` in ``folder``, hashed in parallel threads."""
    def one(name):
        path = folder / name
        entry = {"size": path.stat().st_size}
        if hashes:
            entry["sha256"] = sha256(path)
        return name, entry

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return dict(pool.map(one, files))


def files_below(folder: Path) -> list[str]:
    """Every file of ``folder`` (relative names) except the manifest."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def check_checkpoint(folder: Path, verify_hashes: bool = True, hashed: dict[str, dict] | None = None) -> str | None:
    """What is wrong with ``folder`` as a checkpoint, or None if it is complete and intact.

    ``hashed``: the files' sizes and hashes if already computed (by several ranks)."""
    manifest_file = folder / MANIFEST
    if not manifest_file.is_file():
        return f"{MANIFEST} is missing (the save did not finish, or the file was removed)"
    try:
        manifest = json.loads(manifest_file.read_text())
        recorded = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} cannot be read ({err})"
    if ".metadata" not in recorded:
        return f"{MANIFEST} lists no .metadata file"
    missing = [name for name in recorded if not (folder / name).is_file()]
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    found = hashed if hashed is not None else describe_files(folder, list(recorded), verify_hashes)
    for name, entry in recorded.items():
        got = found[name]
        if got["size"] != entry["size"]:
            return f"{name} has {got['size']} bytes but the manifest records {entry['size']}"
        if verify_hashes and got.get("sha256") != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest (the file is damaged)"
    return None


def step_folders(root: Path) -> list[Path]:
    """The ``step_*`` folders of a run's ``checkpoints`` directory, newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def resolve_checkpoint(path: str | Path, verify_hashes: bool = True) -> Path:
    """A checkpoint folder, or a run directory's newest complete checkpoint, checked against its manifest
    (every file's size, and its sha256 unless ``verify_hashes`` is false); anything else is refused with
    what it is."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass a run directory or one of its checkpoints/step_NNNNNN")
    if (path / "checkpoints").is_dir():
        pointer = path / "checkpoints" / LATEST
        if not pointer.is_file():
            raise UsageError(f"{path} is a run directory without a complete checkpoint (no checkpoints/{LATEST}); "
                             "let the run save one (it saves at the end or on a stop signal)")
        path = path / "checkpoints" / pointer.read_text().strip()
    elif not path.is_dir() or not (path / MANIFEST).is_file():
        raise UsageError(f"{path} is neither a run directory (no checkpoints/) nor a checkpoint folder (no "
                         f"{MANIFEST}); pass a run directory or one of its checkpoints/step_NNNNNN")
    problem = check_checkpoint(path, verify_hashes=verify_hashes)
    if problem is not None:
        raise CheckpointError(f"{path} is not a usable checkpoint: {problem}")
    return path
